"""Health rules on real Lightning models in short fits: the demo Transformer learns without a
vanishing event; a 20-layer sigmoid MLP is flagged within 10 steps."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.demos import Transformer
from torch.nn import functional as F

from gradwatch.lightning import GradWatch
from tests.helpers.lightning_models import Classifier, loader, sigmoid_stack, trainer

pytestmark = pytest.mark.filterwarnings("ignore::gradwatch.GradientHealthWarning")


class TokenModel(Classifier):
    def __init__(self, vocab: int = 100):
        super().__init__(Transformer(vocab_size=vocab, nlayers=2, nhid=64, ninp=32, nhead=4))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        out = self.net(x, x)  # learn to copy the tokens
        loss = F.nll_loss(out, x.reshape(-1))
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def vanishing(cb):
    return sorted({e.param for e in cb.events if e.kind == "vanishing"})


@pytest.mark.slow  # 20-70 s on two shared cores
def test_demo_transformer_learns_without_vanishing_events():
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (40 * 8, 16), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=8)
    model = TokenModel()
    cb = GradWatch(enable_checks=False, on_vanish="ignore")
    trainer(callbacks=[cb]).fit(model, data)
    assert vanishing(cb) == []
    assert model.losses[-1] < model.losses[0] - 0.3  # it learns


def test_twenty_layer_sigmoid_mlp_vanishes_within_ten_steps():
    torch.manual_seed(0)
    cb = GradWatch(enable_checks=False, on_vanish="ignore")
    trainer(callbacks=[cb], max_steps=10).fit(
        Classifier(sigmoid_stack(depth=20), optimizer="adam", lr=1e-3), loader(n=320)
    )
    events = [e for e in cb.events if e.kind == "vanishing"]
    assert "net.0.weight" in {e.param for e in events}
    assert max(e.step for e in events) < 10  # Lightning's steps are 0-based
    assert "net.38.weight" not in {e.param for e in events}  # the layer nearest the loss
