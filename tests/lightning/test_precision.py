"""GradWatch on training steps that make or cast float32 themselves, and on compiled modules (issue 11)."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.demos import Transformer
from torch import nn
from torch.nn import functional as F

from gradwatch.lightning import GradWatch
from tests.helpers import real_code as rc
from tests.helpers.lightning_models import trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class Step(L.LightningModule):
    """``training_step`` written as real code is: the step makes its own float32 tensors."""

    def __init__(self, kind: str, scale: float = 1.0, log: bool = True) -> None:
        super().__init__()
        self.kind, self.logs = kind, log
        self.net = rc.Denoiser(scale=scale) if kind == "diffusion" else rc.Binary(scale=scale)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.kind == "bce":  # integer labels made float in the loss
            loss = F.binary_cross_entropy_with_logits(self.net(x).squeeze(1), y.float())
        elif self.kind == "gan":  # targets made with the default dtype
            loss = F.binary_cross_entropy_with_logits(self.net(x), torch.ones(x.shape[0], 1))
        else:  # a timestep drawn in the step, fed to a Linear with the input
            t = torch.rand(x.shape[0], device=self.device)
            noise = torch.randn_like(x)
            loss = F.mse_loss(self.net((1 - t[:, None]) * x + t[:, None] * noise, t), noise)
        if self.logs:  # Dynamo cannot compile self.log (Lightning 2.6, torch 2.13)
            self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def binary_loader(n: int = 64, batch_size: int = 16):
    x, y = rc.binary_batch(n=n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def fit(module, cb, data=None, **kw):
    trainer(callbacks=[cb], **kw).fit(module, data if data is not None else binary_loader())
    return cb


def assert_checked_and_clean(cb, caplog):
    assert "switched off" not in caplog.text
    assert cb.reports and all(r.dtype == "float64" for r in cb.reports)
    assert all(r.verdict == "pass" for r in cb.reports), str(cb.reports[0])
    assert cb.events == []


@pytest.mark.parametrize("kind", ["bce", "gan", "diffusion"])
def test_step_made_float32_is_checked_in_float64(kind, caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")  # events are INFO records
    torch.manual_seed(0)
    cb = fit(Step(kind), GradWatch(check_every_n_steps=2))
    assert len(cb.reports) == 2
    assert_checked_and_clean(cb, caplog)
    assert max(r.max_rel_error for r in cb.reports) < 1e-5
    torch.manual_seed(0)
    buggy = fit(Step(kind, scale=0.9), GradWatch(check_every_n_steps=2, on_mismatch="ignore"))
    param = "net.inp.weight" if kind == "diffusion" else "net.body.0.weight"
    assert {(e.kind, e.param) for e in buggy.events} == {("mismatch", param)}


class DemoTransformer(L.LightningModule):
    """``lightning.pytorch.demos.Transformer``, small, trained as LightningTransformer trains it."""

    def __init__(self, vocab: int = 23) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=vocab, ninp=8, nhead=2, nhid=16, nlayers=1)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self.model(inputs, target), target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_demo_transformer_passes(caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")  # events are INFO records
    torch.manual_seed(0)
    ids = rc.token_batch(n=8, length=7, vocab=23)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=4
    )
    cb = fit(DemoTransformer(), GradWatch(check_every_n_steps=1, num_params=16), data)
    assert len(cb.reports) == 2
    assert_checked_and_clean(cb, caplog)


# --- torch.compile -------------------------------------------------------------------------------


class CountingBackend:
    def __init__(self) -> None:
        self.compilations = 0

    def __call__(self, gm, example_inputs):
        self.compilations += 1
        return gm.forward


def compilations(where: str, watch: bool, caplog) -> tuple[int, GradWatch | None]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    backend = CountingBackend()
    module = Step("bce", log=False)
    target: nn.Module = module
    if where == "submodule":
        module.net.body[0] = torch.compile(module.net.body[0], backend=backend)
    else:  # trainer.fit(torch.compile(module)): Lightning unwraps it and compiles its methods
        target = torch.compile(module, backend=backend)
    cb = GradWatch(check_every_n_steps=1) if watch else None
    trainer(callbacks=[cb] if cb else [], max_steps=4).fit(target, binary_loader())
    return backend.compilations, cb


@pytest.mark.parametrize("where", ["submodule", "whole module"])
def test_checks_of_compiled_code_compile_nothing(where, caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")  # events are INFO records
    alone, _ = compilations(where, watch=False, caplog=caplog)
    watched, cb = compilations(where, watch=True, caplog=caplog)
    assert watched == alone >= 1
    assert cb is not None and len(cb.reports) == 4
    assert_checked_and_clean(cb, caplog)
