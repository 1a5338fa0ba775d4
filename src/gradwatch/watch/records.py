"""Pure helpers over records: global norms, events merged across ranks, the callbacks' record views."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch.sinks import Sink

if TYPE_CHECKING:
    from gradwatch.watch.watcher import Watcher

__all__ = [
    "WatchRecords",
    "global_norm",
    "merge_rank_events",
    "new_run_id",
    "write_event",
    "write_event_counts",
]


def new_run_id() -> str:
    """A short unique id for one training run: 12 hex digits of a ``uuid4``.

    ``uuid4`` draws from ``os.urandom``, so no random stream of Python, numpy or torch is touched.

    Example:
        >>> a, b = new_run_id(), new_run_id()
        >>> len(a), a != b, int(a, 16) >= 0
        (12, True, True)
    """
    return uuid.uuid4().hex[:12]


def global_norm(norms: Mapping[str, float] | Iterable[float]) -> float:
    """``sqrt(Σ ‖g‖²)``.

    Example:
        >>> global_norm({"a": 3.0, "b": 4.0})
        5.0
    """
    values = norms.values() if isinstance(norms, Mapping) else norms
    return math.sqrt(sum(float(n) ** 2 for n in values))


def merge_rank_events(per_rank: Sequence[Sequence[GradientEvent]]) -> list[GradientEvent]:
    """Events of several ranks as one list: an event seen on several ranks is one event.

    Events are keyed by ``(step, kind, param)``; the worst value is kept (for every kind a larger
    value is worse, except ``vanishing``), and the message names the ranks that saw it.

    Example:
        >>> a = GradientEvent(3, "mismatch", "w", 0.1, 1e-3, "off")
        >>> b = GradientEvent(3, "mismatch", "w", 0.2, 1e-3, "off")
        >>> [(e.value, e.message) for e in merge_rank_events([[a], [b]])]
        [(0.2, 'off (ranks 0, 1)')]
        >>> [e.message for e in merge_rank_events([[], [a]])]
        ['off (rank 1)']
    """
    if len(per_rank) <= 1:
        return list(per_rank[0]) if per_rank else []
    merged: dict[tuple[int, str, str], tuple[GradientEvent, list[int]]] = {}
    for rank, events in enumerate(per_rank):
        for e in events:
            key = (e.step, e.kind, e.param)
            if key not in merged:
                merged[key] = (e, [rank])
                continue
            kept, ranks = merged[key]
            worse = e.value < kept.value if e.kind == "vanishing" else e.value > kept.value
            merged[key] = (e if worse else kept, [*ranks, rank])
    out = []
    for e, ranks in merged.values():
        note = (
            f" (rank {ranks[0]})" if len(ranks) == 1 else f" (ranks {', '.join(map(str, ranks))})"
        )
        out.append(GradientEvent(e.step, e.kind, e.param, e.value, e.threshold, e.message + note))
    return out


def write_event(sink: Sink, event: GradientEvent) -> None:
    """``sink.write_event(event)`` as a function (for ``functools.partial``)."""
    sink.write_event(event)


def write_event_counts(sink: Sink, step: int, counts: Mapping[str, int]) -> None:
    """``sink.write_event_counts(step, counts)`` as a function (for ``functools.partial``)."""
    sink.write_event_counts(step, counts)


class WatchRecords:
    """What both callbacks expose from their :class:`Watcher` (a mixin; needs ``self._watcher``)."""

    _watcher: Watcher

    @property
    def reports(self) -> list[CheckReport]:
        """The latest check reports (bounded)."""
        return self._watcher.reports

    @property
    def events(self) -> list[GradientEvent]:
        """Events so far (bounded; ``events_dropped`` counts the rest)."""
        return self._watcher.events

    @property
    def events_dropped(self) -> int:
        """Events beyond the in-memory cap."""
        return self._watcher.events_dropped
