"""Batched evaluation with torch.func.vmap, and its fallback to the loop, give the loop's verdicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch.torch.vmap as gwt
from gradwatch.torch import check_gradients
from gradwatch.torch.checker import TorchChecker
from tests.helpers.torch_zoo import CNN, MLP, RNN, classify, make_batch
from tests.torch.test_check import _noisy_loss, _with_grads, assert_unchanged, snapshot


@pytest.fixture
def every_group(monkeypatch):
    """Send every tensor's perturbations through vmap, even a single direction's two."""
    monkeypatch.setattr(gwt, "VMAP_MIN_GROUP", 2)


def _same_results(a, b, rel=1e-5):
    """Same verdict, entries, statuses; numbers equal up to the loss's rounding noise."""
    assert a.verdict == b.verdict, f"{a}\n{b}"
    assert [(r.param, r.index, r.status) for r in a.results] == [
        (r.param, r.index, r.status) for r in b.results
    ]
    for x, y in zip(a.results, b.results, strict=True):
        assert x.analytic == y.analytic
        # Rounding noise of the loss divided by the step is ~1e-11 here: an absolute allowance.
        scale = max(abs(x.analytic), abs(x.numeric))
        assert abs(x.numeric - y.numeric) <= rel * scale + 1e-9, (x, y)
    assert [(e.kind, e.param) for e in a.events] == [(e.kind, e.param) for e in b.events]


def _checks(model, batch, vectorize, mode, n=2):
    checker = TorchChecker(model, classify, mode=mode, vectorize=vectorize)
    reports = [checker.check(batch, sample_seed=s) for s in range(n)]
    return checker, reports


@pytest.mark.parametrize("mode", ["coordinate", "directional"])
def test_batchnorm_dropout_cnn_through_vmap_matches_the_loop(mode, every_group):
    torch.manual_seed(0)
    model = CNN().train()
    batch = make_batch("cnn", n=8)
    checker, vm = _checks(model, batch, True, mode)
    _, loop = _checks(model, batch, False, mode)
    # Every tensor went through vmap; the convolutions before BatchNorm needed batched buffers.
    assert {n: p.mode for n, p in checker.batching.items()} == dict.fromkeys(checker.names, "vmap")
    assert checker.batching["conv1.weight"].batched_buffers
    for a, b in zip(vm, loop, strict=True):
        assert a.verdict == "pass"
        _same_results(a, b)


@pytest.mark.parametrize("mode", ["coordinate", "directional"])
def test_lstm_falls_back_to_the_loop_where_vmap_has_no_batching_rule(mode, every_group):
    torch.manual_seed(1)
    model = RNN(cell="lstm").train()
    batch = make_batch("seq", n=8)
    checker, vm = _checks(model, batch, True, mode)
    _, loop = _checks(model, batch, False, mode)
    plans = checker.batching
    assert plans["rnn.weight_hh_l0"].mode == "loop"
    assert "batching rule" in plans["rnn.weight_hh_l0"].reason.lower()
    assert plans["out.weight"].mode == "vmap"  # after the LSTM: batched fine
    for a, b in zip(vm, loop, strict=True):
        assert a.verdict == "pass"
        _same_results(a, b)


class _ScaledGradLinear(torch.autograd.Function):
    """x @ W.T + b whose weight gradient is 10% short; runs under vmap (generated rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b):
        return x @ w.T + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, 0.9 * (g.T @ x), g.sum(0)


class _BuggyHead(MLP):
    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.fc1(x))))
        h = torch.tanh(self.fc2(h))
        return _ScaledGradLinear.apply(h, self.out.weight, self.out.bias)


def test_a_bug_seen_through_vmap_is_reported_like_the_loop_reports_it(every_group):
    torch.manual_seed(2)
    model = _BuggyHead(batchnorm=True).train()
    batch = make_batch("mlp")
    checker, vm = _checks(model, batch, True, "coordinate", n=1)
    _, loop = _checks(model, batch, False, "coordinate", n=1)
    assert checker.batching["out.weight"].mode == "vmap"
    assert vm[0].verdict == "fail"
    assert [(e.kind, e.param) for e in vm[0].events] == [("mismatch", "out.weight")]
    _same_results(vm[0], loop[0])


def test_vmap_that_disagrees_with_the_loop_is_dropped_for_the_loop(every_group):
    def odd_loss(model, batch):
        # A loss_fn whose value changes under vmap: the safety net must catch it.
        under_vmap = torch._C._functorch.is_batchedtensor(model.out.bias)
        return classify(model, batch) + (1.0 if under_vmap else 0.0)

    torch.manual_seed(3)
    model = MLP().train()
    batch = make_batch("mlp")
    checker = TorchChecker(model, odd_loss, vectorize=True)
    report = checker.check(batch)
    plan = checker.batching["out.bias"]
    assert plan.mode == "loop" and "different loss" in plan.reason
    assert report.verdict == "pass", str(report)
    _same_results(report, TorchChecker(model, odd_loss, vectorize=False).check(batch))


def test_memory_budget_keeps_big_batches_out_of_vmap(monkeypatch, every_group):
    monkeypatch.setattr(gwt, "VMAP_MEMORY_BYTES", 1)
    torch.manual_seed(4)
    checker, reports = _checks(MLP(), make_batch("mlp"), True, "coordinate", n=1)
    assert {p.mode for p in checker.batching.values()} == {"loop"}
    assert all("memory" in p.reason for p in checker.batching.values())
    assert reports[0].verdict == "pass"


@pytest.mark.parametrize("mode", ["coordinate", "directional"])
def test_automatic_choice_gives_the_loops_verdicts_on_the_zoo(mode):
    torch.manual_seed(5)
    for model, kind in [(MLP(batchnorm=True), "mlp"), (CNN(), "cnn"), (RNN(), "seq")]:
        batch = make_batch(kind)
        checker, auto = _checks(model.train(), batch, None, mode, n=3)
        _, loop = _checks(model, batch, False, mode, n=3)
        if mode == "coordinate":  # the big tensors get enough coordinates to be worth measuring
            assert any(p.loop_seconds for p in checker.batching.values()), "nothing measured"
        assert {p.mode for p in checker.batching.values()} <= {"vmap", "loop", "measure"}
        for a, b in zip(auto, loop, strict=True):
            _same_results(a, b)


def test_vmap_check_leaves_no_trace(every_group):
    torch.manual_seed(6)
    model = MLP(batchnorm=True)
    batch = make_batch("mlp")
    _with_grads(model, batch)
    before = snapshot(model)
    checker = TorchChecker(model, _noisy_loss, vectorize=True)
    checker.check(batch)
    assert any(p.mode == "vmap" for p in checker.batching.values())
    assert_unchanged(before, model)


def test_in_place_model_through_vmap_is_restored_exactly(every_group):
    torch.manual_seed(7)
    model = MLP(batchnorm=True).double()  # already float64: checked in place
    batch = make_batch("mlp")
    _with_grads(model, (batch[0].double(), batch[1]))
    before = snapshot(model)
    report = check_gradients(model, batch, classify, vectorize=True)
    assert report.verdict == "pass"
    assert_unchanged(before, model)


def test_vectorize_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match=r"vectorize must be True, False or None, got 'auto'"):
        check_gradients(
            nn.Linear(2, 1), torch.randn(3, 2), lambda m, x: m(x).sum(), vectorize="auto"
        )
