"""The float64 guard: checks stay in float64 whatever the training step creates or casts (issue 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.torch import check_gradients
from gradwatch.torch.checker import TorchChecker
from gradwatch.torch.precision import Float64Guard
from tests.helpers import real_code as rc

# --- the guard on its own -------------------------------------------------------------------------


def test_factories_and_casts_come_out_float64():
    labels = torch.tensor([1, 0, 1])
    held = torch.ones(3)  # a float32 tensor made before the guard
    with Float64Guard():
        made = {
            "ones": torch.ones(2, 1),
            "zeros": torch.zeros(2),
            "full": torch.full((2,), 1.0),
            "tensor": torch.tensor(1.0),
            "arange": torch.arange(0, 1, 0.5),
            "arange dtype=float": torch.arange(3, dtype=torch.float),
            "rand": torch.rand(2),
            "randn": torch.randn(2),
            "float()": labels.float(),
            "half()": labels.half(),
            "bfloat16()": labels.bfloat16(),
            "to(float32)": labels.to(torch.float32),
            "to(dtype=float32)": labels.to(dtype=torch.float32),
            "to(other)": labels.to(held),
            "type(FloatTensor)": labels.type(torch.FloatTensor),
            "type('torch.FloatTensor')": labels.type("torch.FloatTensor"),
            "type_as(float32)": labels.type_as(held),
            "softmax(dtype=float32)": torch.softmax(torch.ones(2), 0, dtype=torch.float32),
            "float32 attribute in a matmul": torch.ones(2, 3, dtype=torch.float64) @ held,
        }
    assert {k: t.dtype for k, t in made.items() if t.dtype != torch.float64} == {}


def test_integers_bool_complex_and_bitcasts_are_left_alone():
    x = torch.tensor([1, 2, 3])
    with Float64Guard():
        assert torch.arange(3).dtype == torch.int64
        assert x.long().dtype == torch.int64 and (x > 1).dtype == torch.bool
        assert x.to(torch.int32).dtype == torch.int32
        assert torch.zeros(2, dtype=torch.complex64).dtype == torch.complex64
        assert torch.ones(2).view(torch.int64).dtype == torch.int64
        assert torch.randint(0, 4, (3,)).dtype == torch.int64


def test_default_dtype_is_restored_even_on_error():
    before = torch.get_default_dtype()
    with pytest.raises(RuntimeError, match="boom"), Float64Guard():
        assert torch.get_default_dtype() == torch.float64
        raise RuntimeError("boom")
    assert torch.get_default_dtype() == before
    assert torch.ones(1).dtype == before


@pytest.mark.parametrize(
    "draw",
    [
        lambda: torch.rand(5),
        lambda: torch.randn(5),
        lambda: torch.rand_like(torch.zeros(5)),
        lambda: torch.randn_like(torch.zeros(5)),
        lambda: torch.normal(0.0, 1.0, (5,)),
        lambda: torch.empty(5).uniform_(),
        lambda: torch.empty(5).normal_(),
    ],
    ids=["rand", "randn", "rand_like", "randn_like", "normal", "uniform_", "normal_"],
)
def test_random_draws_read_the_generator_as_the_model_does(draw):
    torch.manual_seed(3)
    expected = draw()
    torch.manual_seed(3)
    with Float64Guard():
        got = draw()
    assert got.dtype == torch.float64
    assert torch.equal(got, expected.double())


def test_float64_draws_of_a_float64_model_stay_float64():
    torch.manual_seed(3)
    expected = torch.rand(4, dtype=torch.float64)
    torch.manual_seed(3)
    with Float64Guard(torch.float64):
        assert torch.equal(torch.rand(4), expected)


# --- checks on real training code: correct → a conclusive pass; a planted bug → caught -----------

CASES = {
    "bce with y.float()": (rc.Binary, rc.bce_step, rc.binary_batch, "body.0.weight"),
    "gan targets torch.ones": (rc.Binary, rc.gan_step, lambda: rc.binary_batch()[0], "body.0.weight"),
    "diffusion torch.rand timestep": (rc.Denoiser, rc.diffusion_step, lambda: rc.binary_batch()[0], "inp.weight"),
    "float32 constants": (rc.Constants, lambda m, b: F.cross_entropy(m(b[0]), b[1]), rc.binary_batch, "lin.weight"),
    "rmsnorm x.float(), logits.float()": (rc.TinyCausalLM, rc.lm_step, rc.token_batch, "up.weight"),
}  # fmt: skip


@pytest.mark.parametrize(("make", "loss", "batch", "param"), CASES.values(), ids=list(CASES))
def test_real_training_code_passes_in_float64_and_catches_a_planted_bug(make, loss, batch, param):
    torch.manual_seed(0)
    report = check_gradients(make(), batch(), loss, seed=1)
    assert report.dtype == "float64"
    assert report.verdict == "pass", str(report)
    assert report.max_rel_error is not None and report.max_rel_error < 1e-5, str(report)
    torch.manual_seed(0)
    buggy = check_gradients(make(scale=0.9), batch(), loss, seed=1)
    assert buggy.verdict == "fail", str(buggy)
    assert ("mismatch", param) in {(e.kind, e.param) for e in buggy.events}, str(buggy)


@pytest.mark.parametrize("vectorize", [False, True])
def test_draws_in_the_step_are_the_same_in_every_evaluation(vectorize):
    # Loop and vmap alike: every evaluation of the diffusion step sees the same timesteps.
    torch.manual_seed(0)
    report = check_gradients(
        rc.Denoiser(), rc.binary_batch()[0], rc.diffusion_step, vectorize=vectorize
    )
    assert report.verdict == "pass" and report.max_rel_error < 1e-5, str(report)


def test_guard_can_be_switched_off_to_measure_it():
    torch.manual_seed(0)
    checker = TorchChecker(rc.Binary(), rc.bce_step)
    checker.float64_guard = False
    # Without the guard the loss is float32 noise judged in float64: the precision floor keeps it
    # from a false "fail", but nothing is verified.
    report = checker.check(rc.binary_batch())
    assert report.verdict == "inconclusive" and not report.events, str(report)


def test_default_dtype_is_restored_after_a_failing_loss():
    def broken(model, batch):
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        check_gradients(nn.Linear(3, 1), torch.randn(4, 3), broken)
    assert torch.get_default_dtype() == torch.float32


def test_float32_check_is_not_widened():
    report = check_gradients(rc.Binary(), rc.binary_batch(), rc.bce_step, dtype="float32")
    assert report.dtype == "float32"


# --- torch.compile: the check runs the eager originals and compiles nothing -----------------------


class CountingBackend:
    """A ``torch.compile`` backend that counts compilations and runs the graph as it is."""

    def __init__(self) -> None:
        self.compilations = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.compilations += 1
        return gm.forward


def _train(model: nn.Module, batch, loss, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()


@pytest.mark.parametrize("where", ["submodule", "whole model", "float64 model in place"])
def test_compiled_code_is_checked_eagerly_and_never_recompiled(where):
    torch._dynamo.reset()
    torch.manual_seed(0)
    backend = CountingBackend()
    model = rc.Binary()
    if where == "float64 model in place":
        model = model.double()
    if where == "whole model":
        model = torch.compile(model, backend=backend)
    else:
        model.body[0] = torch.compile(model.body[0], backend=backend)
    x, y = rc.binary_batch()
    batch = (x.to(next(model.parameters()).dtype), y)
    _train(model, batch, rc.bce_step)
    compiled = backend.compilations
    assert compiled >= 1
    report = check_gradients(model, batch, rc.bce_step)
    assert report.verdict == "pass", str(report)
    assert report.params == ("body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias")
    _train(model, batch, rc.bce_step, steps=1)
    assert backend.compilations == compiled


def test_compiled_submodule_with_a_planted_bug_is_caught():
    torch._dynamo.reset()
    backend = CountingBackend()
    model = rc.Binary(scale=0.9)
    model.body[0] = torch.compile(model.body[0], backend=backend)
    report = check_gradients(model, rc.binary_batch(), rc.bce_step)
    assert ("mismatch", "body.0.weight") in {(e.kind, e.param) for e in report.events}
    assert backend.compilations == 0
