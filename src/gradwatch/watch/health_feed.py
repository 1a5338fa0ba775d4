"""What the health rules are fed: norm rows held in blocks and judged together, and the zero labels
of a check.

The watcher hands every observed step's norms to a :class:`HealthFeed`. The health rules' per-step
cost is paid once per block of :data:`HEALTH_BLOCK` rows (same events, same steps, as one row at a
time); a non-finite or above-limit value has its block judged at once. :func:`zero_labels` turns a
check report into the evidence :meth:`~gradwatch.core.health.HealthMonitor.mark_zero` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gradwatch.core.health import HealthMonitor, HealthThresholds
from gradwatch.report import CheckReport, GradientEvent

__all__ = ["HEALTH_BLOCK", "HealthFeed", "zero_labels"]

#: Norm observations judged together (a block): the health rules' per-step cost is paid once per
#: block. A non-finite or above-threshold value is judged at once, whatever the block holds.
HEALTH_BLOCK = 16


def zero_labels(report: CheckReport) -> dict[str, bool]:
    """Per checked tensor: whether every informative entry of it was labelled ``zero``.

    ``kink`` entries say nothing either way; a tensor with only kinks is left out.

    Example:
        >>> from gradwatch.report import EntryResult
        >>> entries = [EntryResult("b", (0,), 0.0, 0.0, None, "zero"),
        ...            EntryResult("w", (0,), 1.0, 1.0, 0.0, "ok")]
        >>> zero_labels(CheckReport(1, "pass", 0.0, tuple(entries), (), "coordinate",
        ...                         "float64", 1e-5, 4, 0.1))
        {'b': True, 'w': False}
    """
    labels: dict[str, bool] = {}
    for entry in report.results:
        if entry.status == "kink":
            continue
        labels[entry.param] = labels.get(entry.param, True) and entry.status == "zero"
    return labels


class HealthFeed:
    """The health rules of one run, and the norm rows waiting for them.

    Observations are judged in blocks of up to :data:`HEALTH_BLOCK` steps (same events, same steps,
    as one at a time); a row with a value above its limit (or non-finite) has its block judged at
    once, so ``nonfinite`` and absolute ``exploding`` act on the step they name. Vanishing (which
    needs ``patience`` steps anyway) and sudden jumps act when their block is judged: at most
    ``HEALTH_BLOCK - 1`` steps later, and at the end of training (:meth:`judge`).

    Args:
        thresholds: The health rules' thresholds.
        scale: Tensor names → ``√numel`` of each (a norm divided by it is the gradient's RMS).
        limits: Tensor names → each one's exploding limit (a row above it is judged at once).
        write_row: Writes one step's norms (``step``, names, row): called for a step with an event
            whose norms were not written.

    Example:
        >>> from gradwatch.core.health import HealthThresholds
        >>> feed = HealthFeed(HealthThresholds(), lambda n: np.ones(len(n)),
        ...                   lambda n: np.full(len(n), 1e3), lambda step, names, row: None)
        >>> feed.start({"w": (1,)})
        >>> feed.add_row(0, {"w": 0.5}, False), feed.steps
        ([], [0])
        >>> [e.kind for e in feed.add_row(1, {"w": float("nan")}, False)], feed.steps
        (['nonfinite'], [])
    """

    def __init__(
        self,
        thresholds: HealthThresholds,
        scale: Callable[[Sequence[str]], npt.NDArray[np.float64]],
        limits: Callable[[Sequence[str]], npt.NDArray[np.float64]],
        write_row: Callable[[int, tuple[str, ...], npt.NDArray[np.float64]], None],
    ) -> None:
        self.thresholds = thresholds
        self.health: HealthMonitor | None = None
        #: Rows a checkpoint carried, judged before the next ones (:meth:`restored`).
        self.pending_rows: list[tuple[int, dict[str, float]]] = []
        self._scale_of = scale
        self._limits_of = limits
        self._write_row = write_row
        self.names: tuple[str, ...] = ()
        self.steps: list[int] = []
        self.written: list[bool] = []
        self.rows = np.empty((HEALTH_BLOCK, 0))
        self.scale = np.ones(0)
        self.limit = np.ones(0)
        self._limit_list: list[float] = []

    def start(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Health rules for these tensors (name → shape, model order); their state is kept."""
        if self.health is None or set(self.health.order) != set(shapes):
            pending = self.health.state_dict() if self.health is not None else None
            self.health = HealthMonitor(shapes, self.thresholds)
            if pending is not None:
                self.health.load_state_dict(pending)

    def restored(self) -> list[GradientEvent]:
        """The events of the rows a checkpoint carried (each judged once, before new rows)."""
        events: list[GradientEvent] = []
        restored, self.pending_rows = self.pending_rows, []
        for old_step, old_norms in restored:  # judged before the new rows, in step order
            events.extend(self.add_row(old_step, old_norms, True))
        return events

    def hold_rows(
        self, steps: Sequence[int], names: Sequence[str], rows: Sequence[Sequence[float]]
    ) -> None:
        """Norm rows observed but not judged yet (a checkpoint's): judged before the next ones."""
        self.pending_rows.extend(
            (int(step), dict(zip(names, row, strict=True)))
            for step, row in zip(steps, rows, strict=True)
        )

    def add_row(self, step: int, norms: Mapping[str, float], written: bool) -> list[GradientEvent]:
        filled = len(self.steps)
        if filled < HEALTH_BLOCK and tuple(norms) == self.names:
            # The every-step path: a row into the block, an urgency test in plain Python.
            values = list(norms.values())
            self.rows[filled] = values
            self.steps.append(step)
            self.written.append(written)
            calm = all(x <= lim for x, lim in zip(values, self._limit_list, strict=True))
            if filled + 1 == HEALTH_BLOCK or not calm:  # NaN is never <= a limit
                return self.judge()
            return []
        row = np.fromiter(norms.values(), dtype=np.float64, count=len(norms))
        return self.add_rows([step], tuple(norms), row[None, :], [written])

    def add_rows(
        self,
        steps: list[int],
        names: tuple[str, ...],
        rows: npt.NDArray[np.float64],
        written: list[bool],
    ) -> list[GradientEvent]:
        """:meth:`add_row` for several steps (row ``i`` is step ``steps[i]``); new names judge the
        rows held first."""
        events: list[GradientEvent] = []
        if names != self.names:
            events.extend(self.judge())
            self.names = names
            self.scale = self._scale_of(names)
            self.limit = self._limits_of(names)
            self._limit_list = self.limit.tolist()
            self.rows = np.empty((HEALTH_BLOCK, len(names)))
        start = 0
        while start < len(steps):
            filled = len(self.steps)
            chunk = rows[start : start + HEALTH_BLOCK - filled]
            k = len(chunk)
            self.rows[filled : filled + k] = chunk
            self.steps.extend(steps[start : start + k])
            self.written.extend(written[start : start + k])
            if len(self.steps) == HEALTH_BLOCK or not (chunk <= self.limit).all():
                events.extend(self.judge())
            start += k
        return events

    def judge(self) -> list[GradientEvent]:
        """Judge the rows held (none: no events); an event's step not written yet is written now."""
        if not self.steps or self.health is None:
            return []
        k = len(self.steps)
        rms = self.rows[:k] / self.scale
        steps, self.steps = self.steps, []
        written, self.written = self.written, []
        events = self.health.observe_block(steps, self.names, rms)
        # The norms of a step with an event are always written.
        for step in sorted({e.step for e in events}):
            if step in steps and not written[steps.index(step)]:
                self._write_row(step, self.names, self.rows[steps.index(step)])
        return events

    def state_dict(self) -> dict[str, Any]:
        """The health rules' state and the rows held, JSON-ready (a checkpoint's)."""
        return {
            "health": self.health.state_dict() if self.health is not None else None,
            "pending_norms": {
                "names": list(self.names),
                "steps": list(self.steps),
                "norms": self.rows[: len(self.steps)].tolist(),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (rows held come back as :attr:`pending_rows`)."""
        health = state.get("health")
        if health is not None:
            if self.health is None:  # shapes come with start(), which keeps this state
                self.health = HealthMonitor({}, self.thresholds)
            self.health.load_state_dict(health)
        pending = state.get("pending_norms") or {}
        if pending.get("steps"):
            self.pending_rows = [
                (int(step), dict(zip(pending["names"], row, strict=True)))
                for step, row in zip(pending["steps"], pending["norms"], strict=True)
            ]
