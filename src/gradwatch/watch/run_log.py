"""What one run keeps and writes: its sinks, and the bounded records held in memory.

Records are written on the writer (rank zero) only, the run's meta record before anything else.
The meta record is :func:`run_meta`. In memory: the latest :data:`MAX_REPORTS` check reports and the first :data:`MAX_EVENTS` events,
with a count of the rest and a running count per kind, written at each step that had events
(scalars for loggers). The :class:`~gradwatch.watch.watcher.Watcher` owns one :class:`RunLog`
and decides what goes into it.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch.records import global_norm, write_event, write_event_counts
from gradwatch.watch.sinks import JsonlSink, Sink

if TYPE_CHECKING:
    from gradwatch.options import WatchConfig

__all__ = ["MAX_EVENTS", "MAX_REPORTS", "RunLog", "run_meta"]

#: Reports kept in memory (the latest); events kept (the first), with a count of the rest.
MAX_REPORTS = 100
MAX_EVENTS = 10_000


def run_meta(run: str, shapes: Mapping[str, Sequence[int]], config: WatchConfig) -> dict[str, Any]:
    """Id, shapes and thresholds of a run, written first so ``inspect`` can judge the norms.

    Example:
        >>> from gradwatch.options import WatchConfig
        >>> meta = run_meta("3f9a", {"w": [2]}, WatchConfig.create())
        >>> meta["run"], meta["shapes"], meta["explode_threshold"]
        ('3f9a', {'w': [2]}, 1000.0)
    """
    from gradwatch.core.finite_diff import tolerances_for

    dtype = config.dtype or "float32"
    th = config.thresholds
    return {
        "run": run,
        "shapes": dict(shapes),
        "vanish_threshold": th.vanish_threshold,
        "explode_threshold": th.explode_threshold,
        "rtol": config.rtol or tolerances_for(dtype).rtol,
    }


class RunLog:
    """The sinks of one run and the records it keeps in memory.

    Args:
        meta: The run's meta record, asked for once before the first record is written (and again
            after :meth:`reset`, or once ``meta_written`` is cleared).

    Example:
        >>> log = RunLog(lambda: {"run": "r"})
        >>> log.keep([GradientEvent(3, "mismatch", "w", 0.1, 1e-3, "off")])
        >>> log.event_counts, len(log.events), log.dropped
        ({'mismatch': 1}, 1, 0)
    """

    def __init__(self, meta: Callable[[], dict[str, Any]]) -> None:
        self._meta = meta
        self.sinks: list[Sink] = []
        self.writer = True
        self.reset()

    def reset(self) -> None:
        """Forget the records (the sinks stay); the next record written is preceded by the meta."""
        self.meta_written = False
        self.reports: deque[CheckReport] = deque(maxlen=MAX_REPORTS)
        self.events: list[GradientEvent] = []
        self.dropped = 0
        self.event_counts: dict[str, int] = {}
        self._unchecked_reasons: set[str] = set()

    def open(self, sinks: Sequence[Sink], *, writer: bool, jsonl_path: str | None) -> None:
        """Close the sinks held, then write to ``sinks`` (and a :class:`JsonlSink` at ``jsonl_path``)."""
        self.close()
        self.sinks = list(sinks)
        if jsonl_path:
            self.sinks.append(JsonlSink(jsonl_path))
        self.writer = writer

    def write(self, what: Callable[[Sink], None], step: int) -> None:
        """``what(sink)`` for every sink, on the writer only; the meta record first, once."""
        if not self.writer or not self.sinks:
            return
        if not self.meta_written:
            self.meta_written = True
            meta = self._meta()
            for sink in self.sinks:
                sink.write_meta(step, meta)
        for sink in self.sinks:
            what(sink)

    def write_norms(self, step: int, norms: Mapping[str, float]) -> None:
        """One step's norms and their global norm."""
        total = global_norm(norms)  # once, whatever the number of sinks
        self.write(lambda sink: sink.write_norms(step, norms, total), step)

    def keep(self, events: Sequence[GradientEvent]) -> None:
        """Keep and write events, then the running counts of their kinds at their steps."""
        for e in events:
            if len(self.events) < MAX_EVENTS:
                self.events.append(e)
            else:
                self.dropped += 1
            self.write(functools.partial(write_event, event=e), e.step)
        if events:
            self._count(events)

    def first_of_its_reason(self, event: GradientEvent) -> bool:
        """Every event is dispatched, but an ``unchecked`` one warns once per reason.

        The reason is the message with its numbers blanked out (the same cause at another step).
        """
        if event.kind != "unchecked":
            return True
        reason = re.sub(r"\d+", "#", f"{event.param}: {event.message}")
        if reason in self._unchecked_reasons:
            return False
        self._unchecked_reasons.add(reason)
        return True

    def _count(self, events: Sequence[GradientEvent]) -> None:
        """Running counts per kind, written at each step that had events (scalars for loggers)."""
        at_step: dict[int, dict[str, int]] = {}
        for e in events:
            n = self.event_counts[e.kind] = self.event_counts.get(e.kind, 0) + 1
            at_step.setdefault(e.step, {})[e.kind] = n
        for step, counts in at_step.items():
            self.write(functools.partial(write_event_counts, step=step, counts=counts), step)

    def flush(self) -> None:
        """Flush every sink."""
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            sink.close()
