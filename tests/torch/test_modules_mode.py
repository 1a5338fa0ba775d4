"""check_gradients(mode="modules") and max_check_memory: each module's own backward as the check."""

from __future__ import annotations

import pytest
import torch

from gradwatch import GradientCheckError
from gradwatch.torch import _compat, assert_gradients, check_gradients, localize
from gradwatch.torch.checker import TorchChecker
from gradwatch.torch.localize import float64_bytes
from tests.helpers.localize_models import (
    CNN_CULPRITS,
    TRANSFORMER_CULPRIT,
    LocCNN,
    cnn_batch,
    cnn_loss,
    demo_transformer,
    lm_loss,
    token_batch,
)
from tests.helpers.real_code import Decoder, ScaledReLU, regression_step, sequence_batch


@pytest.mark.parametrize("bug", sorted(CNN_CULPRITS))
def test_each_planted_bug_fails_with_one_event_naming_its_module(bug):
    torch.manual_seed(1)
    report = check_gradients(LocCNN(bug), cnn_batch(), cnn_loss, mode="modules")
    assert report.verdict == "fail" and report.mode == "modules", str(report)
    failing = [e for e in report.events if e.kind in ("mismatch", "disconnected")]
    assert [e.module for e in failing] == [CNN_CULPRITS[bug]], str(report)
    assert failing[0].message.startswith(f"the backward of {CNN_CULPRITS[bug]} (")
    assert "nearer the loss" not in failing[0].message  # the module is named: no generic advice
    if bug == "detached":
        assert failing[0].kind == "disconnected"


def test_a_correct_cnn_passes_and_entries_name_module_inputs_and_parameters():
    torch.manual_seed(1)
    report = check_gradients(LocCNN(), cnn_batch(), cnn_loss, mode="modules")
    assert report.verdict == "pass" and not report.events, str(report)
    assert report.max_rel_error < 1e-6
    params = set(report.params)
    assert {"block2.act:input", "block1.conv.weight", "head.bias"} <= params, params
    assert "module evaluations" in str(report) and report.evaluations > 0


def test_the_demo_transformer_bug_is_named_and_the_correct_one_passes():
    bad = check_gradients(demo_transformer(bug=True), token_batch(), lm_loss, mode="modules")
    assert bad.verdict == "fail"
    assert {e.module for e in bad.events} == {TRANSFORMER_CULPRIT}, str(bad)
    good = check_gradients(demo_transformer(bug=False), token_batch(), lm_loss, mode="modules")
    assert good.verdict == "pass", str(good)
    # out_proj is never called as a module (its weights are checked in the attention's check):
    # no note about it at every check
    assert not any("never called" in n for n in good.notes), good.notes


def test_assert_gradients_names_the_module():
    torch.manual_seed(1)
    with pytest.raises(GradientCheckError, match=r"block2\.act \(MyGELU\)"):
        assert_gradients(LocCNN("activation"), cnn_batch(), cnn_loss, mode="modules")


def test_the_model_is_left_exactly_as_it_was():
    torch.manual_seed(1)
    model = LocCNN("norm")
    batch = cnn_batch()
    cnn_loss(model, batch).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    check_gradients(model, batch, cnn_loss, mode="modules")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())


def test_mode_modules_needs_float64_and_the_mode_error_lists_it():
    with pytest.raises(ValueError, match=r"dtype must be 'float64' with mode='modules'.*'float32'"):
        check_gradients(LocCNN(), cnn_batch(), cnn_loss, mode="modules", dtype="float32")
    with pytest.raises(ValueError, match=r"'coordinate', 'directional', 'modules'; got 'layer'"):
        check_gradients(LocCNN(), cnn_batch(), cnn_loss, mode="layer")


def test_each_check_of_a_reused_checker_draws_its_own_directions():
    torch.manual_seed(1)
    checker = TorchChecker(LocCNN(), cnn_loss, mode="modules")
    first = checker.check(cnn_batch(), sample_seed=1)
    second = checker.check(cnn_batch(), sample_seed=2)
    assert first.verdict == second.verdict == "pass"
    assert [r.analytic for r in first.results] != [r.analytic for r in second.results]


def test_a_copy_that_is_not_the_models_function_falls_back_to_coordinates(monkeypatch):
    # The local checks run on the float64 copy's modules: when the copy is not the model's
    # function they would check something else, so the check says so and uses coordinates.
    monkeypatch.setattr(_compat, "unshadow_submodules", lambda original, copy: 0)
    torch.manual_seed(0)
    report = check_gradients(
        Decoder(ScaledReLU(0.9)), sequence_batch(), regression_step, mode="modules"
    )
    assert report.verdict == "fail", str(report)
    assert any("fell back to mode='coordinate'" in n for n in report.notes), report.notes
    assert all(r.index is not None for r in report.results)  # coordinates, not directions


@pytest.mark.parametrize("bug", ["activation", None])
def test_a_model_over_max_check_memory_is_checked_module_by_module(bug):
    torch.manual_seed(1)
    model = LocCNN(bug)
    limit = float64_bytes(model.block1) + 8  # block1 fits alone; block2, head, the model do not
    assert float64_bytes(model) > limit
    report = check_gradients(model, cnn_batch(), cnn_loss, max_check_memory=limit)
    assert report.mode == "modules", str(report)
    assert any("checked module by module" in n for n in report.notes), report.notes
    assert any("needs the float64 copy of the whole model" in n for n in report.notes)
    assert any("too large to check alone" in n for n in report.notes)
    if bug:
        assert [e.module for e in report.events] == ["block2.act"], str(report)
    else:
        assert report.verdict == "pass", str(report)
    assert all(p.dtype is torch.float32 and p.grad is None for p in model.parameters())


def test_a_model_within_max_check_memory_is_checked_as_asked():
    torch.manual_seed(1)
    model = LocCNN()
    report = check_gradients(
        model, cnn_batch(), cnn_loss, max_check_memory=10 * float64_bytes(model)
    )
    assert report.mode == "coordinate" and report.verdict == "pass"
    with pytest.raises(ValueError, match="max_check_memory"):
        check_gradients(model, cnn_batch(), cnn_loss, max_check_memory=-1)


def test_a_sparse_embedding_gradient_is_checked_not_skipped():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4, sparse=True)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.emb(x).mean(1))

    torch.manual_seed(0)
    batch = torch.randint(0, 20, (5, 3))
    report = check_gradients(Net(), batch, lambda m, x: m(x).pow(2).sum(), mode="modules")
    assert report.verdict == "pass", str(report)
    assert {"emb.weight", "<model>:<submodule parameters>"} <= set(report.params), str(report)
    assert not any("not checked" in n for n in report.notes), report.notes


def test_include_selects_modules_by_name_and_a_pattern_matching_none_is_an_error():
    torch.manual_seed(1)
    report = check_gradients(
        LocCNN("activation"), cnn_batch(), cnn_loss, mode="modules", include=r"^block2\.act$"
    )
    assert report.params == ("block2.act:input",), str(report)
    assert [e.module for e in report.events] == ["block2.act"]
    with pytest.raises(ValueError, match=r"include/exclude left no module to check"):
        check_gradients(LocCNN(), cnn_batch(), cnn_loss, mode="modules", include="nothing")


class _TextRNN(torch.nn.Module):
    """Tutorial text classifier: padded positions feed the LSTM; torch gives the padding row no
    gradient by design (``padding_idx``), although the loss depends on it."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8, padding_idx=0)
        self.rnn = torch.nn.LSTM(8, 8, batch_first=True)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, tok):
        _, (h, _) = self.rnn(self.emb(tok))
        return self.fc(h[-1])


def _padded_batch():
    tok = torch.randint(1, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    tok[:, 4:] = 0  # right-padded
    return tok, torch.tensor([0, 1, 1, 0])


def _text_loss(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1])


@pytest.mark.parametrize("mode", ["coordinate", "directional", "modules"])
def test_an_embeddings_padding_row_is_left_alone_not_a_false_alarm(mode):
    torch.manual_seed(0)
    model = _TextRNN()
    report = check_gradients(model, _padded_batch(), _text_loss, mode=mode, num_params=400)
    assert report.verdict == "pass", str(report)
    assert all(
        r.index is None or r.index[0] != 0 for r in report.results if r.param == "emb.weight"
    )
    assert localize(model, _padded_batch(), _text_loss).culprit is None


class _HookedBlock(torch.nn.Module):
    """Grad-CAM style: ``forward`` registers a hook on an activation (``scale`` != 1: a bug)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.scale = scale
        self.saved = None

    def _keep(self, g):
        self.saved = g
        return g * self.scale if self.scale != 1.0 else None

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h.register_hook(self._keep)
        return h


@pytest.mark.parametrize("mode", ["coordinate", "directional", "modules"])
def test_a_forward_that_registers_tensor_hooks_is_checked_not_crashed(mode):
    # evaluations run without autograd; Tensor.register_hook refuses that, so gradwatch
    # evaluates with autograd on for such a step instead of crashing (or skipping the module)
    torch.manual_seed(0)
    batch = (torch.randn(8, 4), torch.randn(8, 2))

    def loss(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    good = torch.nn.Sequential(_HookedBlock(), torch.nn.Linear(4, 2))
    report = check_gradients(good, batch, loss, mode=mode)
    assert report.verdict == "pass" and not report.notes, str(report)
    assert good[0].saved is None  # the hook ran on the copy, not on the model
    bad = torch.nn.Sequential(_HookedBlock(0.9), torch.nn.Linear(4, 2))
    failed = check_gradients(bad, batch, loss, mode=mode)
    assert failed.verdict == "fail", str(failed)
    if mode == "modules":
        assert [e.module for e in failed.events] == ["0"], str(failed)


def test_a_module_that_cannot_run_alone_is_named_in_one_note():
    class Child(torch.nn.Module):
        ready = False

        def forward(self, x):
            if not self.ready:
                raise RuntimeError("called outside its parent")
            return torch.tanh(x)

    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.child = Child()

        def forward(self, x):
            self.child.ready = True
            try:
                return self.child(self.lin(x))
            finally:
                self.child.ready = False

    report = check_gradients(Parent(), torch.randn(5, 3), lambda m, x: m(x).sum(), mode="modules")
    assert report.verdict == "pass", str(report)
    assert [n for n in report.notes if "not checked" in n] == [
        "1 module was not checked (child: it could not be re-run alone (RuntimeError: called "
        "outside its parent))"
    ]


class _BadScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s, (g * x).sum().reshape(s.shape) * 2.0  # wrong: x2 on the scale's gradient


def test_parameters_no_module_call_holds_are_checked_on_the_whole_loss():
    # Lightning style: the step calls a submodule and uses a root parameter itself (CLIP's
    # logit_scale); the model is never called, so no local check sees logit_scale.
    class CLIPish(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(4, 4)
            self.logit_scale = torch.nn.Parameter(torch.ones(()))

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(_BadScale.apply(m.enc(b[0]), m.logit_scale), b[1])

    torch.manual_seed(0)
    batch = (torch.randn(5, 4), torch.randn(5, 4))
    report = check_gradients(CLIPish(), batch, loss_fn, mode="modules")
    assert report.verdict == "fail", str(report)
    assert [(e.kind, e.param) for e in report.events] == [("mismatch", "logit_scale")]
    assert any(
        n.startswith("1 tensor lies in no checked module (logit_scale") for n in report.notes
    )
    assert {"enc.weight", "enc.bias", "logit_scale"} <= set(report.params)


def test_over_max_check_memory_include_selects_the_modules_holding_the_parameters():
    torch.manual_seed(1)
    model = LocCNN("activation")  # the bug is in block2.act, which holds no parameter
    limit = float64_bytes(model.block1) + 8
    only = check_gradients(
        model, cnn_batch(), cnn_loss, max_check_memory=limit, include=r"block1\."
    )
    assert only.verdict == "pass", str(only)
    assert {r.param.split(":")[0].rsplit(".", 1)[0] for r in only.results} <= {
        "block1.conv",
        "block1.norm",
        "block1",
    }, only.params
    assert any("selected the modules that hold the selected parameters" in n for n in only.notes)
    without = check_gradients(
        model, cnn_batch(), cnn_loss, max_check_memory=limit, exclude="block1"
    )
    assert [e.module for e in without.events] == ["block2.act"], str(without)
    # modules holding excluded parameters are left out; parameter-free ones are not
    assert not any(r.param.startswith(("block1.conv", "block1.norm")) for r in without.results)
