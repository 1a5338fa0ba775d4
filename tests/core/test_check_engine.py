"""The engine on a pure-numpy problem: a known loss, a known gradient, injected bugs."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence

import numpy as np
import pytest

from gradwatch.core.check import MAX_RESAMPLE_ROUNDS, Perturbation, run_check


class NumpyProblem:
    """L(W, b) = sum(softplus(X W + b) * Y) + relu-ish terms; gradient exact, bugs injectable."""

    def __init__(self, seed=0, grad_scale=None, disconnect=None, kink=False, dtype=np.float64):
        rng = np.random.default_rng(seed)
        self.X = rng.standard_normal((16, 5))
        self.Y = rng.standard_normal((16, 3))
        self.params = [rng.standard_normal((5, 3)) * 0.5, rng.standard_normal(3) * 0.1]
        self.params = [p.astype(dtype) for p in self.params]
        self._names = ["layer.weight", "layer.bias"]
        self.grad_scale = grad_scale or {}
        self.disconnect = disconnect
        self.kink = kink
        self._dtype = np.dtype(dtype)
        self.calls = 0

    names = property(lambda self: self._names)
    shapes = property(lambda self: [p.shape for p in self.params])
    dtype = property(lambda self: self._dtype)

    def _loss(self, W, b):
        z = self.X @ W.astype(np.float64) + b.astype(np.float64)
        act = np.abs(z) if self.kink else np.logaddexp(0, z)
        return float(np.sum(act * self.Y))

    @property
    def base_loss(self):
        return self._loss(*self.params)

    def values(self, t):
        return self.params[t].copy()

    def gradient(self, t):
        if self.disconnect == t:
            return None
        W, b = self.params
        z = self.X @ W + b
        dact = np.sign(z) if self.kink else 1 / (1 + np.exp(-z))
        dz = dact * self.Y
        g = [self.X.T @ dz, dz.sum(0)][t]
        return g * self.grad_scale.get(t, 1.0)

    def losses(self, perts: Sequence[Perturbation]):
        out = []
        for p in perts:
            vals = [x.copy() for x in self.params]
            if p.index is None:
                vals[p.tensor] = p.value.astype(self._dtype)
            else:
                vals[p.tensor][p.index] = p.value
            out.append(self._loss(*vals))
            self.calls += 1
        return np.array(out)


@pytest.mark.parametrize("mode", ["coordinate", "directional"])
@pytest.mark.parametrize("seed", range(10))
def test_correct_gradient_passes(mode, seed):
    prob = NumpyProblem(seed)
    r = run_check(prob, num_params=8, mode=mode, rng=np.random.default_rng(seed))
    assert r.verdict == "pass", str(r)
    assert r.max_rel_error < 1e-6
    assert r.events == ()
    assert r.evaluations == 1 + prob.calls  # passing entries cost two evaluations each


@pytest.mark.parametrize("mode", ["coordinate", "directional"])
@pytest.mark.parametrize(("tensor", "scale"), [(0, 0.98), (1, 0.9), (1, -1.0), (0, 0.0)])
def test_injected_bugs_fail_with_an_event_on_the_right_tensor(mode, tensor, scale):
    for seed in range(5):
        prob = NumpyProblem(seed, grad_scale={tensor: scale})
        r = run_check(prob, num_params=8, mode=mode, rng=np.random.default_rng(seed))
        assert r.verdict == "fail", str(r)
        kind = "disconnected" if scale == 0.0 else "mismatch"
        assert [(e.kind, e.param) for e in r.events] == [(kind, prob.names[tensor])]
        assert r.events[0].threshold == r.rtol


def test_no_autograd_path_but_dependence_is_disconnected():
    r = run_check(NumpyProblem(0, disconnect=1), num_params=8, rng=np.random.default_rng(0))
    assert r.verdict == "fail"
    assert [(e.kind, e.param) for e in r.events] == [("disconnected", "layer.bias")]
    assert "no gradient" in r.events[0].message


def test_kinks_are_marked_and_resampled_not_failed():
    # |z| has kinks; with a large eps many entries straddle one.
    prob = NumpyProblem(3, kink=True)
    prob.params[0][:, :] = 0.0
    prob.params[1][:] = 1e-3  # z = 1e-3 everywhere: a step of 1e-2 crosses the kink of |z|
    r = run_check(prob, num_params=6, rng=np.random.default_rng(0), eps=1e-2)
    assert r.verdict != "fail", str(r)
    assert any(e.status == "kink" for e in r.results)
    replaced = sum(e.status == "kink" for e in r.results)
    assert len(r.results) <= 6 + replaced * 1 + MAX_RESAMPLE_ROUNDS * 6


def test_zero_gradient_entries_are_zero_not_mismatch():
    prob = NumpyProblem(0)
    prob.Y[:] = 0.0  # loss identically zero: every entry is below resolution
    r = run_check(prob, num_params=8, rng=np.random.default_rng(0))
    assert {e.status for e in r.results} == {"zero"}
    assert r.verdict == "inconclusive"
    assert r.max_rel_error is None


def test_nonfinite_gradient_gives_a_nonfinite_event_not_a_crash():
    prob = NumpyProblem(0, grad_scale={0: np.nan})
    r = run_check(prob, num_params=4, rng=np.random.default_rng(0), step=12)
    assert r.verdict == "inconclusive"
    assert [(e.kind, e.step) for e in r.events] == [("nonfinite", 12)]


def test_float32_is_judged_in_aggregate_and_says_so(monkeypatch):
    from gradwatch.core import verdict as check_mod

    monkeypatch.setattr(check_mod, "_LOW_PRECISION_WARNED", False)
    with pytest.warns(UserWarning, match="bugs smaller than about 40%"):
        run_check(NumpyProblem(1, dtype=np.float32), num_params=8, rng=np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not once per check
        run_check(NumpyProblem(1, dtype=np.float32), num_params=8, rng=np.random.default_rng(0))
    ok = run_check(NumpyProblem(1, dtype=np.float32), num_params=8, rng=np.random.default_rng(0))
    assert ok.verdict == "pass" and ok.rtol == 0.4
    assert any("float32" in n for n in ok.notes)
    bad = run_check(
        NumpyProblem(1, dtype=np.float32, grad_scale={0: -1.0}),
        num_params=8,
        rng=np.random.default_rng(0),
    )
    assert bad.verdict == "fail"


def test_tensors_argument_restricts_the_check():
    r = run_check(NumpyProblem(0), tensors=[1], num_params=4, rng=np.random.default_rng(0))
    assert r.params == ("layer.bias",)


def test_report_is_json_serialisable_and_round_trips():
    from gradwatch import CheckReport

    r = run_check(NumpyProblem(0, grad_scale={1: 0.5}), num_params=8, rng=np.random.default_rng(0))
    text = json.dumps(r.to_dict())
    back = CheckReport.from_dict(json.loads(text))
    assert back == r
    s = str(r)
    assert "FAIL" in s and "layer.bias" in s and "mismatch" in s


def test_unknown_mode_is_a_value_error():
    with pytest.raises(ValueError, match="mode must be one of"):
        run_check(NumpyProblem(0), mode="spiral", rng=np.random.default_rng(0))


def test_kink_right_at_the_parameter_is_caught_by_one_sided_slopes():
    # z = b = 1e-13 sits 2e-8 steps from the kink of |z|: the central estimates at h and h/2
    # both average the two slopes and agree with each other, but not with autodiff's one side.
    for seed in range(5):
        prob = NumpyProblem(seed, kink=True)
        prob.params[0][:, :] = 0.0
        prob.params[1][:] = 1e-13
        r = run_check(prob, tensors=[1], num_params=3, rng=np.random.default_rng(seed))
        assert r.verdict != "fail", str(r)
        assert any(e.status == "kink" for e in r.results)


def test_one_sided_test_does_not_hide_real_bugs_at_smooth_points():
    for seed in range(5):
        prob = NumpyProblem(seed, kink=True, grad_scale={0: 0.9})  # |z| is smooth away from 0
        r = run_check(prob, num_params=8, rng=np.random.default_rng(seed))
        assert ("mismatch", "layer.weight") in [(e.kind, e.param) for e in r.events], str(r)


class QuadraticProblem:
    """L(w) = ½·Σ(w − 1)² at distance ``d`` from its optimum; ``rounding`` adds absolute rounding
    of the loss (to multiples of it), ``float32`` returns the loss rounded to float32."""

    def __init__(self, d=3e-3, grad_scale=1.0, rounding=0.0, float32=False, noise=0.0, n=8):
        self.w = np.full(n, 1.0 + d)
        self.grad_scale, self.rounding, self.float32 = grad_scale, rounding, float32
        self.noise = noise

    names = property(lambda self: ["w"])
    shapes = property(lambda self: [self.w.shape])
    dtype = property(lambda self: np.dtype(np.float64))

    def _loss(self, w):
        value = 0.5 * float(np.sum((w - 1.0) ** 2))
        if self.rounding:
            value = round(value / self.rounding) * self.rounding
        if self.noise:  # absolute rounding noise: deterministic in w, pseudo-random
            seed = int.from_bytes(np.asarray(w, dtype=np.float64).tobytes()[-8:], "little")
            value += self.noise * np.random.default_rng(seed).standard_normal()
        return float(np.float32(value)) if self.float32 else value

    base_loss = property(lambda self: self._loss(self.w))

    def values(self, t):
        return self.w.copy()

    def gradient(self, t):
        return (self.w - 1.0) * self.grad_scale

    def losses(self, perts):
        out = []
        for p in perts:
            w = self.w.copy()
            if p.index is None:
                w[:] = p.value
            else:
                w[p.index] = p.value
            out.append(self._loss(w))
        return np.array(out)


@pytest.mark.parametrize("d", [3e-3, 1e-4, 1e-6])
def test_halved_gradient_near_an_optimum_is_a_mismatch_not_a_kink(d):
    # The one-sided gap h·L'' is large next to a small gradient, but it halves with h: smooth.
    r = run_check(QuadraticProblem(d, grad_scale=0.5), num_params=8, rng=np.random.default_rng(0))
    assert r.verdict == "fail", str(r)
    assert {e.status for e in r.results} == {"mismatch"}
    ok = run_check(QuadraticProblem(d), num_params=8, rng=np.random.default_rng(0))
    assert ok.verdict == "pass", str(ok)


def test_float32_loss_in_a_float64_check_is_zero_with_the_reason_never_mismatch():
    for scale in (1.0, 0.5):
        prob = QuadraticProblem(0.3, grad_scale=scale, float32=True)
        r = run_check(prob, num_params=8, rng=np.random.default_rng(0))
        assert r.verdict == "inconclusive", str(r)
        assert {e.status for e in r.results} == {"zero"}
        assert any("below what the loss evaluations resolve" in n for n in r.notes)


@pytest.mark.parametrize("d", [1e-8, 1e-9])
def test_a_loss_too_coarse_to_move_at_all_is_zero_not_mismatch(d):
    # Every evaluation returns the same value (the change is below the loss's rounding step).
    r = run_check(QuadraticProblem(d, rounding=1e-9), num_params=8, rng=np.random.default_rng(0))
    assert r.verdict == "inconclusive", str(r)
    assert {e.status for e in r.results} == {"zero"}
    assert any("below what the loss evaluations resolve" in n for n in r.notes)


@pytest.mark.parametrize(
    ("scale", "recheck_above", "directions"),
    [
        (1.0005, 0.1, 2),  # passed at 5e-4 (> 0.1 rtol): a second, fresh direction
        (1.0005, None, 1),  # no second look asked for
        (1.00001, 0.1, 1),  # passed at 1e-5: far enough under rtol
    ],
)
def test_a_direction_that_passed_close_to_rtol_gets_a_second_look(scale, recheck_above, directions):
    problem = NumpyProblem(grad_scale={0: scale})
    report = run_check(
        problem, mode="directional", rng=np.random.default_rng(0), recheck_above=recheck_above
    )
    weight = [r for r in report.results if r.param == "layer.weight"]
    assert len(weight) == directions, report
    assert len({r.analytic for r in weight}) == directions  # a different direction each
    assert report.verdict == "pass"
    assert len([r for r in report.results if r.param == "layer.bias"]) == 1


class PaddedProblem(NumpyProblem):
    """Autodiff gives entry (0, 0) of the weight no gradient on purpose (torch's padding row)."""

    def __init__(self, declare: bool):
        super().__init__()
        self.declare = declare

    def gradient(self, t):
        g = super().gradient(t)
        if t == 0:
            g = g.copy()
            g[0, 0] = 0.0
        return g

    def excluded(self, t):
        if not self.declare or t != 0:
            return None
        mask = np.zeros(self.params[0].shape, dtype=bool)
        mask[0, 0] = True
        return mask


@pytest.mark.parametrize("mode", ["coordinate", "directional"])
def test_entries_the_adapter_excludes_are_never_sampled_nor_in_a_direction(mode):
    # num_params=18 covers every coordinate of both tensors (15 + 3): (0, 0) is the one left out
    declared = run_check(
        PaddedProblem(True), mode=mode, num_params=18, rng=np.random.default_rng(0)
    )
    assert declared.verdict == "pass", declared
    assert all(r.index != (0, 0) for r in declared.results if r.param == "layer.weight")
    undeclared = run_check(
        PaddedProblem(False), mode=mode, num_params=18, rng=np.random.default_rng(0)
    )
    assert undeclared.verdict == "fail", undeclared  # the zeroed entry is a mismatch otherwise
