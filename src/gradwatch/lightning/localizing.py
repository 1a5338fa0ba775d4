"""When a check fails in a Lightning run: the framework-free
:class:`~gradwatch.watch.localizing.FailureLocalizer`, with rank zero's decision holding for every
rank under DDP (a localization re-runs ``training_step``, which may hold collectives).
"""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch import Trainer

from gradwatch.watch.localizing import FAILING, FailureLocalizer, with_events

__all__ = ["FAILING", "FailureLocalizer", "rank_zero_decides", "with_events"]


def rank_zero_decides(trainer: Trainer) -> Callable[[bool], bool] | None:
    """How ranks agree on localizing: rank zero's decision, broadcast (``None`` on one process)."""
    if trainer.world_size <= 1:
        return None
    return lambda due: bool(trainer.strategy.broadcast(due, src=0))
