"""The float64 copy must compute the module's function, in a Trainer too (issue 11, item 2)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from gradwatch.lightning import GradWatch
from tests.helpers.lightning_models import Classifier, loader, trainer
from tests.helpers.real_code import Decoder, ScaledReLU
from tests.helpers.torch_zoo import MLP

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class Regressor(L.LightningModule):
    """A ``training_step`` that logs and keeps its outputs, as Lightning's docs show."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.outputs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        self.outputs.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def sequences(n: int = 32, batch_size: int = 8):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 5, 8, generator=g), torch.randn(n, 1, generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def fit(module, cb, data, **kw):
    t = trainer(callbacks=[cb], **kw)
    t.fit(module, data)
    return t


@pytest.mark.filterwarnings("ignore::gradwatch.GradientHealthWarning")
def test_a_decoder_whose_copy_lost_its_buggy_activation_is_caught_in_fit(monkeypatch):
    # As in tests/torch/test_faithful.py: without the twin's repair, the model itself is evaluated.
    from gradwatch.torch import _compat

    monkeypatch.setattr(_compat, "unshadow_submodules", lambda original, copy: 0)
    torch.manual_seed(0)
    cb = GradWatch(check_every_n_steps=2)
    module = Regressor(Decoder(ScaledReLU(0.9)))
    fit(module, cb, sequences())
    assert cb.reports and all(r.verdict == "fail" for r in cb.reports), cb.reports[0]
    assert "mismatch" in {e.kind for e in cb.events}
    assert "unchecked" not in {e.kind for e in cb.events}
    assert any("functional_call" in n for n in cb.reports[0].notes)
    assert len(module.outputs) == 4  # the checks' passes of training_step left no trace


def test_a_correct_decoder_passes_in_fit_with_no_unchecked_event():
    torch.manual_seed(0)
    cb = GradWatch(check_every_n_steps=2)
    module = Regressor(Decoder(ScaledReLU(1.0)))
    t = fit(module, cb, sequences())
    assert cb.events == [] and all(r.verdict == "pass" for r in cb.reports)
    assert len(module.outputs) == 4
    assert set(t.callback_metrics) <= {"train_loss", "gradwatch/grad_norm/global"}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_batchnorm_dropout_model_gives_no_false_disagreement(precision):
    torch.manual_seed(0)
    cb = GradWatch(check_every_n_steps=2)
    fit(Classifier(MLP(batchnorm=True, dropout=0.3)), cb, loader(), precision=precision)
    assert cb.events == []
    assert cb.reports and all(r.verdict == "pass" for r in cb.reports)
    assert not any("functional_call" in n for r in cb.reports for n in r.notes)
