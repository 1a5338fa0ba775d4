"""When to run a check: a fixed period, or a cost budget fed with measured durations.

Schedules are small objects with ``due(step_index) -> bool`` and two feeds, ``record_step`` and
``record_check``, so they are tested with a fake clock and need no framework.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

__all__ = ["BudgetSchedule", "FixedSchedule", "Schedule", "make_schedule"]


class Schedule(Protocol):
    """What the callbacks need from a schedule."""

    def due(self, index: int) -> bool:
        """Whether a check runs at the optimizer step with 0-based ``index``."""
        ...

    def record_step(self, seconds: float) -> None:
        """Measured duration of one training step, check time excluded."""
        ...

    def record_check(self, seconds: float) -> None:
        """Measured duration of one check."""
        ...

    def explain(self) -> str:
        """One sentence on when the next check is due and why."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Resumable state."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


class FixedSchedule:
    """A check every ``period`` optimizer steps, starting with the first.

    Example:
        >>> s = FixedSchedule(3)
        >>> [i for i in range(8) if s.due(i)]
        [0, 3, 6]
    """

    def __init__(self, period: int) -> None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(
                f"check_every_n_steps must be None (cost budget) or an integer >= 1, got {period!r}"
            )
        self.period = period

    def due(self, index: int) -> bool:
        return index % self.period == 0

    def record_step(self, seconds: float) -> None:
        return None

    def record_check(self, seconds: float) -> None:
        return None

    def explain(self) -> str:
        return f"a check every {self.period} optimizer steps"

    def state_dict(self) -> dict[str, Any]:
        return {"period": self.period}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class BudgetSchedule:
    """The first optimizer step, then whenever training time since the last check has paid for it.

    A check is due once the training time accumulated since the previous check reaches
    ``last_check_seconds / max_overhead``, so checks take at most ``max_overhead`` of the time
    measured for training. The clock is whatever the caller feeds in.

    Example:
        >>> s = BudgetSchedule(0.1)
        >>> s.due(0)
        True
        >>> s.record_check(1.0)          # the check took 1 s: 10 s of training pays for the next
        >>> for _ in range(9): s.record_step(1.0)
        >>> s.due(10)
        False
        >>> s.record_step(1.0); s.due(11)
        True
    """

    def __init__(self, max_overhead: float) -> None:
        if (
            isinstance(max_overhead, bool)
            or not isinstance(max_overhead, (int, float))
            or not (0 < max_overhead <= 1)
        ):
            raise ValueError(f"max_overhead must be a number in (0, 1], got {max_overhead!r}")
        self.max_overhead = float(max_overhead)
        self.checks = 0
        self.last_check_seconds = 0.0
        self.train_seconds_since = 0.0

    @property
    def needed_seconds(self) -> float:
        """Training time that must pass after the last check before the next."""
        return self.last_check_seconds / self.max_overhead

    def due(self, index: int) -> bool:
        if self.checks == 0:
            return True
        return self.train_seconds_since >= self.needed_seconds

    def record_step(self, seconds: float) -> None:
        self.train_seconds_since += max(0.0, float(seconds))

    def record_check(self, seconds: float) -> None:
        self.checks += 1
        self.last_check_seconds = max(0.0, float(seconds))
        self.train_seconds_since = 0.0

    def steps_until_due(self, mean_step_seconds: float) -> int:
        """Steps of ``mean_step_seconds`` until the next check is due (at least 1).

        Distributed callbacks turn the time budget into a step count on one rank and broadcast it,
        so every rank checks at the same step.

        Example:
            >>> s = BudgetSchedule(0.5); s.record_check(1.0)
            >>> s.steps_until_due(0.25)
            8
        """
        left = self.needed_seconds - self.train_seconds_since
        if mean_step_seconds <= 0:
            return 1
        return max(1, math.ceil(left / mean_step_seconds))

    def explain(self) -> str:
        if self.checks == 0:
            return "the first check runs at the first optimizer step"
        left = max(0.0, self.needed_seconds - self.train_seconds_since)
        return (
            f"the last check took {self.last_check_seconds:.3g}s; at max_overhead="
            f"{self.max_overhead:g} the next is due after {self.needed_seconds:.3g}s of training "
            f"({left:.3g}s to go)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "last_check_seconds": self.last_check_seconds,
            "train_seconds_since": self.train_seconds_since,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checks = int(state.get("checks", 0))
        self.last_check_seconds = float(state.get("last_check_seconds", 0.0))
        self.train_seconds_since = float(state.get("train_seconds_since", 0.0))


def make_schedule(check_every_n_steps: int | None, max_overhead: float) -> Schedule:
    """``None`` → :class:`BudgetSchedule`; an integer ≥ 1 → :class:`FixedSchedule`.

    Example:
        >>> type(make_schedule(None, 0.02)).__name__, type(make_schedule(5, 0.02)).__name__
        ('BudgetSchedule', 'FixedSchedule')
    """
    if check_every_n_steps is None:
        return BudgetSchedule(max_overhead)
    return FixedSchedule(check_every_n_steps)
