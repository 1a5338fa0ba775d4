"""Agreement across ranks, through ``trainer.strategy``: one place for every collective.

Under DDP every rank checks its own batch at the same steps with the same coordinates. After a
check the ranks exchange their events (each event once, with the number of ranks that saw it),
whether any rank had to switch checks off, and rank zero's plan for the next check. On a single
device the strategy's ``broadcast``/``reduce_boolean_decision`` return their input, so the same code
runs everywhere. Health rules need no agreement: under DDP ``.grad`` is already averaged, so every
rank sees the same norms and reaches the same events and actions.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch import Trainer

from gradwatch.report import GradientEvent
from gradwatch.watch.watcher import merge_rank_events

__all__ = ["Agreement", "agree_after_check"]


@dataclass(frozen=True)
class Agreement:
    """What all ranks hold after a check."""

    events: list[GradientEvent]
    disable: bool
    next_check: int | None


def agree_after_check(
    trainer: Trainer, events: list[GradientEvent], disable: bool, plan: int | None
) -> Agreement:
    """Every rank's events merged, whether any rank gave up, and rank zero's plan.

    A collective: every rank must call it at the same check (they do: the plan is agreed).
    """
    strategy = trainer.strategy
    world = trainer.world_size
    if world <= 1:
        return Agreement(list(events), disable, plan)
    mine = [e.to_dict() for e in events]
    per_rank = []
    for rank in range(world):
        got = strategy.broadcast(mine if trainer.global_rank == rank else None, src=rank)
        per_rank.append([GradientEvent.from_dict(d) for d in got or ()])
    any_disable = strategy.reduce_boolean_decision(disable, all=False)
    next_check = strategy.broadcast(plan, src=0)
    return Agreement(merge_rank_events(per_rank), bool(any_disable), next_check)
