"""When a check fails in a training run: which module's backward is wrong (on the same batch).

The first failing check always localizes (no cost is known yet); later ones only while the time
spent localizing stays under ``max_overhead`` of the measured training time (the schedule's own
:class:`~gradwatch.core.schedule.BudgetSchedule`). Framework-free: the Lightning and Keras
callbacks hand in the localization to run and, under DDP, how ranks agree on the decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from gradwatch.core.schedule import BudgetSchedule
from gradwatch.localization import LocalizationReport
from gradwatch.report import CheckReport, GradientEvent

__all__ = ["FAILING", "KEEP", "FailureLocalizer", "with_events"]

#: Event kinds a localization explains.
FAILING = ("mismatch", "disconnected")
#: Localizations kept (the latest).
KEEP = 16


class FailureLocalizer:
    """Localizes failing checks within a time budget and names the culprit in their events.

    Args:
        max_overhead: Share of training time localizations may take after the first.

    Example:
        >>> f = FailureLocalizer(0.02)
        >>> f.due()   # the first failing check always localizes
        True
    """

    def __init__(self, max_overhead: float) -> None:
        self.budget = BudgetSchedule(max_overhead)
        self.reports: list[LocalizationReport] = []

    def record_step(self, seconds: float) -> None:
        """A training step's measured time (what pays for the next localization)."""
        self.budget.record_step(seconds)

    def due(self, agree: Callable[[bool], bool] | None = None) -> bool:
        """Whether to localize now; ``agree`` turns this process's decision into the one all
        ranks take (rank zero's clock decides)."""
        due = self.budget.due(0)
        return agree(due) if agree is not None else due

    def run(
        self,
        localize: Callable[[], LocalizationReport],
        events: list[GradientEvent],
        warn: Callable[[str], None],
        agree: Callable[[bool], bool] | None = None,
    ) -> tuple[list[GradientEvent], float]:
        """``events`` with the culprit named (when due and found), and the seconds spent.

        A localization that raises never stops training: ``warn`` gets ``"(Type: message)"``.
        """
        # A check in mode="modules" names the module itself: nothing left to localize.
        if not any(e.kind in FAILING and e.module is None for e in events) or not self.due(agree):
            return events, 0.0
        started = time.perf_counter()
        try:
            found: LocalizationReport | None = localize()
        except Exception as exc:  # a localization never stops training
            warn(f"({type(exc).__name__}: {exc})")
            found = None
        spent = time.perf_counter() - started
        self.budget.record_check(spent)
        if found is None:
            return events, spent
        self.reports = [*self.reports, found][-KEEP:]
        return found.annotate(events), spent


def with_events(report: CheckReport | None, events: list[GradientEvent]) -> CheckReport | None:
    """The report carrying the (localized) events that match its own, by kind and tensor."""
    if report is None:
        return None
    mine = {(e.kind, e.param): e for e in events}
    return replace(report, events=tuple(mine.get((e.kind, e.param), e) for e in report.events))
