"""Standalone DDP run for tests/test_lightning_ddp.py (Lightning re-launches this file per rank).

Usage: python tests/scripts/ddp_script.py MODE OUTDIR, MODE in {halt, raise, budget, nan, modules}.
Writes OUTDIR/rank{R}.json with what that rank saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from lightning.pytorch import Callback
from torch import nn

from gradwatch import GradientCheckError
from gradwatch.lightning import GradWatch
from tests.helpers.lightning_models import Classifier, ScaledGradFn, loader, trainer


class RankBug(nn.Module):
    """Correct on rank 0; the weight gradient is scaled by 0.9 on rank 1."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(12, 16).weight.detach().clone())

    def forward(self, x):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return ScaledGradFn.apply(x, self.weight, 0.9 if rank == 1 else 1.0)


class NaNOnRank1(Classifier):
    """Rank 1's loss is NaN at step 4: DDP's averaged gradients are NaN on both ranks."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 4 and self.trainer.global_rank == 1:
            loss = loss * float("nan")
        return loss


def main() -> None:
    mode, outdir = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    buggy = mode in ("halt", "raise", "modules")
    first = RankBug() if buggy else nn.Linear(12, 16)
    net = nn.Sequential(first, nn.Tanh(), nn.BatchNorm1d(16), nn.Linear(16, 4))
    if mode == "budget":
        cb = GradWatch(max_overhead=0.5)
    elif mode == "modules":
        cb = GradWatch(check_every_n_steps=3, mode="modules", on_mismatch="halt")
    elif mode == "nan":
        cb = GradWatch(enable_checks=False)  # on_nonfinite="halt"
    else:
        cb = GradWatch(check_every_n_steps=3, on_mismatch=mode)
    seen: dict[str, object] = {}

    class Seen(Callback):
        def on_train_end(self, trainer, pl_module):  # before GradWatch's teardown
            seen["max_check_memory"] = cb._rerun.max_check_memory if cb._rerun else None

    t = trainer(
        callbacks=[cb, Seen()],
        devices=2,
        strategy="ddp",
        max_steps=12,
        max_epochs=50,
        deterministic=False,
    )
    record: dict[str, object] = {}
    module = NaNOnRank1(net) if mode == "nan" else Classifier(net)
    try:
        t.fit(module, loader(n=256, batch_size=8))
    except GradientCheckError as exc:
        record["raised"] = str(exc)
    rank = int(os.environ.get("LOCAL_RANK", t.global_rank))
    record.update(
        rank=rank,
        global_step=t.global_step,
        events=[e.to_dict() for e in cb.events],
        checks=[r.step for r in cb.reports],
        verdicts=[r.verdict for r in cb.reports],
        finite=all(bool(torch.isfinite(p).all()) for p in module.parameters()),
        modules=[sorted({e.module for e in r.events if e.module}) for r in cb.reports],
        max_check_memory=seen.get("max_check_memory"),
    )
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"rank{rank}.json").write_text(json.dumps(record))
    if "raised" in record:
        sys.exit(3)


if __name__ == "__main__":
    main()
