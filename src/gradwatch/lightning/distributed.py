"""Agreement across ranks, through ``trainer.strategy``: one place for every collective.

Under DDP every rank checks its own batch at the same steps with the same coordinates. After a
check the ranks exchange their events (each event once, with the number of ranks that saw it),
whether any rank had to switch checks off, and rank zero's plan for the next check. On a single
device the strategy's ``broadcast``/``reduce_boolean_decision`` return their input, so the same code
runs everywhere. Health rules see the same averaged ``.grad`` on every rank under DDP, but a halt or
raise is still decided through the strategy (:func:`agree_calm`, :func:`agree_action`): a rank that
stopped alone would leave the others blocked in their next collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch import Trainer

from gradwatch.core.policy import Action
from gradwatch.errors import GradientCheckError
from gradwatch.report import GradientEvent
from gradwatch.watch.watcher import merge_rank_events

__all__ = ["Agreement", "agree_action", "agree_after_check", "agree_calm"]


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


def agree_calm(trainer: Trainer, calm: torch.Tensor) -> bool:
    """Whether a step's gradients are calm on every rank: one all-reduce of the device flag under
    distributed training, then one host read.

    Example: the per-step "norms finite and under the limit" test, so every rank skips the same
    update.
    """
    if trainer.world_size <= 1:
        return bool(calm)
    bad = trainer.strategy.reduce((~calm).to(torch.float32), reduce_op="sum")
    return not bool(bad)


def agree_action(trainer: Trainer, action: Action) -> Action:
    """Halt if any rank halts, raise on every rank if any rank raises (a collective under DDP).

    Every rank must call it at the same step: callers do so where health observations are judged
    (fixed steps) and only when a health policy can halt or raise.
    """
    if trainer.world_size <= 1:
        return action
    strategy = trainer.strategy
    halt = bool(strategy.reduce_boolean_decision(action.halt, all=False))
    raises = bool(strategy.reduce_boolean_decision(action.error is not None, all=False))
    error = action.error
    if raises and error is None:
        error = GradientCheckError(
            "GradWatch: another rank raised on a gradient-health event (its error names it)"
        )
    reason = action.reason
    if halt and reason is None:
        reason = "another rank asked to stop (its events are in the logs)"
    return Action(halt=halt, error=error, reason=reason, since=action.since)
