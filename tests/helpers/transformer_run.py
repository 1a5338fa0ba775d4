"""A short Lightning run of the demo Transformer with a planted x0.9 activation bug, logged to
TensorBoard: the 67-tensor run behind the inspect plot tests and docs/img/inspect-transformer.png."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gradwatch.lightning import GradWatch
from tests.helpers.lightning_models import trainer
from tests.helpers.localize_models import demo_transformer, lm_loss, token_batch


class DemoLM(L.LightningModule):
    """``lightning.pytorch.demos.Transformer`` (2+2 layers, 67 tensors) on generated tokens."""

    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.model = demo_transformer(bug)

    def training_step(self, batch, batch_idx):
        return lm_loss(self.model, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit_buggy_transformer(root: Path, steps: int = 4, check_every: int = 2) -> GradWatch:
    """Fit ``steps`` steps, a check every ``check_every``, logged under ``root/transformer``."""
    inputs, target = token_batch(n=4 * steps, seed=1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, target), batch_size=4)
    cb = GradWatch(
        check_every_n_steps=check_every,
        log_every_n_steps=1,
        on_mismatch="ignore",
        on_vanish="ignore",
    )
    logger = TensorBoardLogger(root, name="transformer")
    trainer(callbacks=[cb], logger=logger, max_steps=steps).fit(DemoLM(bug=True), data)
    return cb
