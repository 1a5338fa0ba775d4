"""The float64 copy must compute the model's function (issue 11, item 2)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.torch import _compat, check_gradients
from gradwatch.torch.checker import TorchChecker
from gradwatch.torch.reference import OwnPass, compare, module_state_kept, own_pass
from gradwatch.torch.substitute import Substituted
from tests.helpers.real_code import Decoder, ScaledReLU, regression_step, sequence_batch
from tests.helpers.torch_zoo import MLP, classify, make_batch


def test_deepcopy_really_drops_the_activation_module():
    # The trap itself: if torch stops doing this, the tests below still hold but say less.
    model = Decoder(ScaledReLU())
    assert isinstance(model.decoder.activation, ScaledReLU)
    assert copy.deepcopy(model).decoder.activation is F.relu


def test_a_copy_that_lost_a_buggy_module_is_caught_by_evaluating_the_model_itself(monkeypatch):
    # The twin now gives a TransformerDecoderLayer its module activation back
    # (_compat.unshadow_submodules); switched off here, it stands for any copy that computes
    # another function: the model itself is then evaluated.
    monkeypatch.setattr(_compat, "unshadow_submodules", lambda original, copy: 0)
    torch.manual_seed(0)
    checker = TorchChecker(Decoder(ScaledReLU(0.9)), regression_step)
    report = checker.check(sequence_batch())
    assert report.verdict == "fail", str(report)
    assert "linear1.weight" in " ".join(e.param for e in report.events if e.kind == "mismatch")
    assert not [e for e in report.events if e.kind == "unchecked"]
    assert any("torch.func.functional_call" in n for n in report.notes), report.notes
    assert "the float64 copy's gradient differs" in checker.copy_disagrees
    # Later checks go straight to the model itself, and keep catching it.
    again = checker.check(sequence_batch(seed=1))
    assert again.verdict == "fail" and any("functional_call" in n for n in again.notes)


def test_the_model_is_untouched_by_a_check_on_the_model_itself():
    torch.manual_seed(0)
    model = Decoder(ScaledReLU(0.9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_gradients(model, sequence_batch(), regression_step)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert isinstance(model.decoder.activation, ScaledReLU)


@pytest.mark.parametrize("activation", [nn.ReLU(), ScaledReLU(1.0)], ids=["relu", "module"])
def test_a_correct_model_passes_with_no_unchecked_event(activation):
    torch.manual_seed(0)
    checker = TorchChecker(Decoder(activation), regression_step)
    report = checker.check(sequence_batch())
    assert report.verdict == "pass", str(report)
    assert not report.events and checker.copy_disagrees == ""
    assert checker.agreement is not None and checker.agreement.agrees
    assert checker.agreement.loss_error < 1e-6 and checker.agreement.gradient_error < 1e-5


def test_train_mode_batchnorm_and_dropout_agree_and_leave_no_trace():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 4)
    ).train()
    batch = make_batch("mlp", 0)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    rng, py, npy = torch.get_rng_state(), random.getstate(), np.random.get_state()
    checker = TorchChecker(model, classify)
    report = checker.check(batch)
    assert report.verdict == "pass", str(report)
    assert checker.agreement is not None and checker.agreement.agrees, checker.agreement
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k  # running statistics, num_batches_tracked
    assert torch.equal(rng, torch.get_rng_state())
    assert random.getstate() == py and np.random.get_state()[1].tolist() == npy[1].tolist()
    assert all(p.grad is None for p in model.parameters())


class _DtypeDependent(nn.Module):
    """Computes another function in float64 (a Python-level dtype test the guard cannot see)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        return out * 1.1 if out.dtype == torch.float64 else out


def test_when_the_model_itself_disagrees_too_the_check_is_unchecked_never_a_verdict():
    torch.manual_seed(0)
    report = check_gradients(_DtypeDependent(), torch.randn(8, 4), lambda m, x: m(x).pow(2).mean())
    assert report.verdict == "inconclusive" and not report.results
    (event,) = report.events
    assert event.kind == "unchecked"
    assert event.message.startswith("the float64 copy's loss differs from the model's by 1.7e-01")
    assert "torch.func.functional_call" in event.message and "dtype=None" in event.message


def test_a_model_already_in_the_check_dtype_is_not_verified():
    model = nn.Linear(3, 1).double()
    checker = TorchChecker(model, lambda m, x: m(x).sum())
    assert checker.check(torch.randn(4, 3, dtype=torch.float64)).verdict == "pass"
    assert checker.agreement is None


def test_a_nonfinite_loss_is_reported_as_nonfinite_not_as_a_disagreement():
    report = check_gradients(nn.Linear(3, 2), torch.randn(5, 3), lambda m, b: m(b).sum() * np.nan)
    assert [e.kind for e in report.events] == ["nonfinite"]


def test_bf16_autocast_in_the_loss_is_judged_at_bf16_precision_with_a_note():
    torch.manual_seed(0)

    def autocast_step(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return classify(m, b)

    checker = TorchChecker(MLP(), autocast_step)
    report = checker.check(make_batch("mlp", 0))
    assert checker.agreement is not None and checker.agreement.tolerance.precision == "bfloat16"
    assert report.verdict == "pass", str(report)
    assert any("bfloat16 pass" in n for n in report.notes), report.notes


# -- the pieces ---------------------------------------------------------------------------------


def test_own_pass_writes_no_grad_and_puts_back_buffers_rng_and_python_state():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    model.seen = []
    model.calls = 0

    def step(m, x):
        m.seen.append(1)
        m.calls += 1
        m.cache = x
        return m(x).sum()

    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3)
    rng = torch.get_rng_state()
    out = own_pass(model, list(model.parameters()), x, step, seed=3)
    assert out.precision == torch.float32 and len(out.grads) == 4
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert model.seen == [] and model.calls == 0 and not hasattr(model, "cache")
    again = own_pass(model, list(model.parameters()), x, step, seed=3)
    assert again.loss == out.loss  # the same seed: the same dropout mask


def test_module_state_kept_restores_plain_tensor_attributes_in_place():
    m = nn.Linear(1, 1)
    m.total = torch.zeros(2)
    kept = m.total
    with module_state_kept(m):
        m.total += 5
    assert m.total is kept and torch.equal(m.total, torch.zeros(2))


def test_substituted_tensors_are_float64_copies_and_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)
            self.b = nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    sub = Substituted(model, lambda m, x: m(x).sum(), torch.float64, torch.device("cpu"))
    (w,) = sub.tensors(["a.weight"])
    assert w.dtype == torch.float64 and w.data_ptr() != model.a.weight.data_ptr()
    x = torch.randn(2, 3, dtype=torch.float64)
    loss = sub.loss_fn(model, x)
    (g,) = torch.autograd.grad(loss, [w])
    expected = torch.autograd.functional.jacobian(
        lambda t: (x @ t.T @ t.T).sum(), model.a.weight.detach().double()
    )
    assert torch.allclose(g, expected)
    assert model.a.weight.dtype == torch.float32


def test_compare_sees_a_scaled_gradient_and_ignores_rounding():
    grads = [torch.ones(3, dtype=torch.float64)]
    assert compare(
        ["w"], 2.0, grads, OwnPass(2.0, [torch.ones(3) * (1 + 1e-7)], torch.float32)
    ).agrees
    bad = compare(["w"], 2.0, grads, OwnPass(2.0, [torch.ones(3) * 0.9], torch.float32))
    assert not bad.agrees and bad.worst_tensor == "w"
    assert compare(["w"], 2.0, grads, OwnPass(2.0, [torch.ones(3) * 0.9], torch.bfloat16)).agrees


def test_a_gradient_hook_on_a_parameter_is_named_as_the_reason_nothing_was_verified():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model[2].weight.register_hook(lambda g: g * 0.9)
    batch = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    report = check_gradients(model, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    assert report.verdict == "inconclusive", str(report)
    (event,) = report.events
    assert event.kind == "unchecked"
    assert event.message.startswith("gradient hooks registered on 2.weight (Tensor.register_hook)")
    assert "most in 2.weight" in event.message
