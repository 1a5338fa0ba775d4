"""The main example: train a small classifier on scikit-learn's digits with GradWatch watching.

A Lightning run with a TensorBoard logger; GradWatch checks gradients (a float64 finite-difference
check on the first step and then within a 2% time budget, plus a fixed check every 25 steps here so
the logs have several), logs per-layer gradient norms and relative errors, and raises nothing on
this healthy model. One custom layer, ``ScaledTanh``, is hand-written with its own backward; pass
``--bug`` to break that backward and watch GradWatch catch it during ``fit``.

Run: python examples/lightning_digits.py [--bug] [--logdir runs/digits] [--mode modules]
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from gradwatch.lightning import GradWatch


class ScaledTanhFn(torch.autograd.Function):
    """``a * tanh(x)`` with a hand-written backward; ``broken`` forgets the ``1 - tanh²`` factor."""

    @staticmethod
    def forward(ctx, x, a, broken):  # type: ignore[override]
        t = torch.tanh(x)
        ctx.save_for_backward(t, a)
        ctx.broken = broken
        return a * t

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        t, a = ctx.saved_tensors
        gx = g * a if ctx.broken else g * a * (1 - t * t)
        ga = (g * t).sum().reshape(a.shape)
        return gx, ga, None


class ScaledTanh(nn.Module):
    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.broken = broken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ScaledTanhFn.apply(x, self.a, self.broken)


class DigitsClassifier(L.LightningModule):
    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 64),
            nn.BatchNorm1d(64),
            ScaledTanh(broken),
            nn.Dropout(0.1),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def digits_loader() -> torch.utils.data.DataLoader:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(
        ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bug", action="store_true", help="break the custom layer's backward")
    ap.add_argument("--logdir", default="runs/digits")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument(
        "--mode",
        default="coordinate",
        choices=["coordinate", "directional", "modules"],
        help="how each check compares gradients (modules: each module's backward alone)",
    )
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    L.seed_everything(0, verbose=False)
    watch = GradWatch(check_every_n_steps=25, mode=args.mode)
    logger = TensorBoardLogger(args.logdir, name="lightning")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[watch],
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(DigitsClassifier(broken=args.bug), digits_loader())

    print(f"\n{len(watch.reports)} gradient checks, {len(watch.events)} events")
    print(watch.reports[-1])
    for event in watch.events[:5]:
        print(event)
    print(f"\nTensorBoard logs: {logger.log_dir}")
    print(f"  tensorboard --logdir {args.logdir}    or    gradwatch inspect {args.logdir}")


if __name__ == "__main__":
    main()
