"""The framework-free half of every callback: configuration, health rules, schedule, records.

A callback (Lightning, Keras) owns a :class:`Watcher`. It hands it gradient norms and check reports
and acts on the returned :class:`~gradwatch.core.policy.Action`; where records are written is the
callback's business (its logger), except the JSON-lines file, which the watcher writes itself.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gradwatch.core.health import HealthMonitor
from gradwatch.core.policy import Action, dispatch
from gradwatch.core.sampling import round_robin
from gradwatch.core.schedule import Schedule, make_schedule
from gradwatch.options import WatchConfig
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch.sinks import JsonlSink

__all__ = ["HEALTH_BLOCK", "MAX_EVENTS", "MAX_REPORTS", "WatchRecords", "Watcher", "global_norm"]

logger = logging.getLogger("gradwatch")

#: Reports kept in memory (the latest); events kept (the first), with a count of the rest.
MAX_REPORTS = 100
MAX_EVENTS = 10_000
#: Norm observations judged together (a block): the health rules' per-step cost is paid once per
#: block. A non-finite or above-threshold value is judged at once, whatever the block holds.
HEALTH_BLOCK = 16


def global_norm(norms: Mapping[str, float]) -> float:
    """``sqrt(Σ ‖g‖²)``.

    Example:
        >>> global_norm({"a": 3.0, "b": 4.0})
        5.0
    """
    return math.sqrt(sum(float(n) ** 2 for n in norms.values()))


class WatchRecords:
    """What both callbacks expose from their :class:`Watcher` (a mixin; needs ``self._watcher``)."""

    _watcher: Watcher
    _warned: set[str]

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

    def _warn_once(self, key: str, message: str) -> None:
        """One ``UserWarning`` (and a log line) per ``key`` for what gradwatch had to skip."""
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


class Watcher:
    """Health rules, schedule, bounded records and the JSON-lines sink for one training run.

    Args:
        config: Validated configuration.
    """

    def __init__(self, config: WatchConfig) -> None:
        self.config = config
        self.schedule: Schedule = make_schedule(config.check_every_n_steps, config.max_overhead)
        self.health: HealthMonitor | None = None
        self.numels: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}
        self._meta_written = False
        self._reports: deque[CheckReport] = deque(maxlen=MAX_REPORTS)
        self._events: list[GradientEvent] = []
        self.events_dropped = 0
        self.checks_done = 0
        self.skipped_steps = 0
        self.jsonl = JsonlSink(config.jsonl_path) if config.jsonl_path else None
        # Norm observations waiting to be judged (see observe_norms).
        self._block_names: tuple[str, ...] = ()
        self._block_steps: list[int] = []
        self._block = np.empty((HEALTH_BLOCK, 0))
        self._block_scale = np.ones(0)
        self._block_limit = np.ones(0)
        self._limit_list: list[float] = []
        self._pending_rows: list[tuple[int, dict[str, float]]] = []

    def start(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Know the tensors (name → shape, model order); keeps health state across restarts."""
        self.shapes = {n: [int(d) for d in s] for n, s in shapes.items()}
        self.numels = {n: int(math.prod(s)) if len(s) else 1 for n, s in shapes.items()}
        if self.health is None or set(self.health.order) != set(shapes):
            pending = self.health.state_dict() if self.health is not None else None
            self.health = HealthMonitor(shapes, self.config.thresholds)
            if pending is not None:
                self.health.load_state_dict(pending)

    def meta(self) -> dict[str, Any]:
        """Shapes and thresholds of this run, written once so ``inspect`` can judge the norms."""
        from gradwatch.core.finite_diff import tolerances_for

        dtype = self.config.dtype or "float32"
        th = self.config.thresholds
        return {
            "shapes": dict(self.shapes),
            "vanish_threshold": th.vanish_threshold,
            "explode_threshold": th.explode_threshold,
            "rtol": self.config.rtol or tolerances_for(dtype).rtol,
        }

    def meta_once(self) -> dict[str, Any] | None:
        """:meth:`meta` the first time (also into the JSON-lines file), ``None`` afterwards."""
        if self._meta_written:
            return None
        self._meta_written = True
        meta = self.meta()
        if self.jsonl is not None:
            self.jsonl.write_meta(meta)
        return meta

    # -- records -----------------------------------------------------------------------------
    @property
    def reports(self) -> list[CheckReport]:
        """The latest :data:`MAX_REPORTS` check reports."""
        return list(self._reports)

    @property
    def events(self) -> list[GradientEvent]:
        """Events, the first :data:`MAX_EVENTS` of them (``events_dropped`` counts the rest)."""
        return list(self._events)

    def _record_events(self, events: Sequence[GradientEvent]) -> None:
        for e in events:
            if len(self._events) < MAX_EVENTS:
                self._events.append(e)
            else:
                self.events_dropped += 1
            if self.jsonl is not None:
                self.jsonl.write_event(e)

    # -- observations ------------------------------------------------------------------------
    def observe_norms(
        self, step: int, norms: Mapping[str, float], *, write: bool
    ) -> tuple[list[GradientEvent], Action]:
        """Feed L2 norms of one optimizer step; returns the events that start now and the action.

        Observations are judged in blocks of up to :data:`HEALTH_BLOCK` steps (same events, same
        steps, as one at a time); a non-finite norm or one above ``explode_threshold`` is judged
        at once, so ``nonfinite`` and absolute ``exploding`` act on the step they name. Vanishing
        (which needs ``patience`` steps anyway) and sudden jumps act when their block is judged:
        at most ``HEALTH_BLOCK - 1`` steps later, and at the end of training (:meth:`flush_health`).
        """
        if write and self.jsonl is not None:
            self.jsonl.write_norms(step, norms, global_norm(norms))
        events = self._prepare(norms)
        events.extend(self._add_row(step, norms))
        self._record_events(events)
        return events, dispatch(events, self.config.policies)

    def observe_norm_rows(
        self,
        steps: Sequence[int],
        names: Sequence[str],
        rows: np.ndarray,
        *,
        write: Sequence[bool],
    ) -> tuple[list[GradientEvent], Action]:
        """:meth:`observe_norms` for several steps read at once (row ``i`` is step ``steps[i]``)."""
        if self.jsonl is not None:
            for i, w in enumerate(write):
                if w:
                    norms = dict(zip(names, rows[i].tolist(), strict=True))
                    self.jsonl.write_norms(int(steps[i]), norms, global_norm(norms))
        events = self._prepare(names)
        events.extend(self._add_rows([int(x) for x in steps], tuple(names), rows))
        self._record_events(events)
        return events, dispatch(events, self.config.policies)

    def _prepare(self, names: Iterable[str]) -> list[GradientEvent]:
        """Health rules ready for these tensors; the events of rows a checkpoint carried."""
        if self.health is None:
            self.start({k: (self.numels.get(k, 1),) for k in names})
        events: list[GradientEvent] = []
        restored, self._pending_rows = self._pending_rows, []
        for old_step, old_norms in restored:  # judged before the new rows, in step order
            events.extend(self._add_row(old_step, old_norms))
        return events

    def _add_row(self, step: int, norms: Mapping[str, float]) -> list[GradientEvent]:
        filled = len(self._block_steps)
        if filled < HEALTH_BLOCK and tuple(norms) == self._block_names:
            # The every-step path: a row into the block, an urgency test in plain Python.
            values = list(norms.values())
            self._block[filled] = values
            self._block_steps.append(step)
            calm = all(x <= lim for x, lim in zip(values, self._limit_list, strict=True))
            if filled + 1 == HEALTH_BLOCK or not calm:  # NaN is never <= a limit
                return self._judge_block()
            return []
        row = np.fromiter(norms.values(), dtype=np.float64, count=len(norms))
        return self._add_rows([step], tuple(norms), row[None, :])

    def _add_rows(
        self, steps: list[int], names: tuple[str, ...], rows: np.ndarray
    ) -> list[GradientEvent]:
        events: list[GradientEvent] = []
        if names != self._block_names:
            events.extend(self._judge_block())
            self._block_names = names
            scale = np.array([math.sqrt(max(1, self.numels.get(k, 1))) for k in names])
            self._block_scale = scale
            self._block_limit = scale * self.config.thresholds.explode_threshold
            self._limit_list = self._block_limit.tolist()
            self._block = np.empty((HEALTH_BLOCK, len(names)))
        start = 0
        while start < len(steps):
            filled = len(self._block_steps)
            chunk = rows[start : start + HEALTH_BLOCK - filled]
            k = len(chunk)
            self._block[filled : filled + k] = chunk
            self._block_steps.extend(steps[start : start + k])
            if len(self._block_steps) == HEALTH_BLOCK or not (chunk <= self._block_limit).all():
                events.extend(self._judge_block())
            start += k
        return events

    def flush_health(self) -> tuple[list[GradientEvent], Action]:
        """Judge the observations still waiting in the current block (call at the end of training)."""
        events = self._judge_block()
        self._record_events(events)
        return events, dispatch(events, self.config.policies)

    def _judge_block(self) -> list[GradientEvent]:
        if not self._block_steps or self.health is None:
            return []
        k = len(self._block_steps)
        rms = self._block[:k] / self._block_scale
        steps, self._block_steps = self._block_steps, []
        return self.health.observe_block(steps, self._block_names, rms)

    def observe_report(self, report: CheckReport) -> Action:
        """Record a check report; returns the action its events call for."""
        self._reports.append(report)
        self.checks_done += 1
        if self.jsonl is not None:
            self.jsonl.write_report(report)
        self._record_events(report.events)
        return dispatch(report.events, self.config.policies, report)

    def schedule_decision(self, step: int) -> str:
        """After a check: when the next one is due and why (logged, and into the JSON lines)."""
        text = self.schedule.explain()
        logger.info("gradwatch: step %d: %s", step, text)
        if self.jsonl is not None:
            self.jsonl.write_schedule(step, text)
        return text

    def observe_event(self, event: GradientEvent) -> Action:
        """Record one event produced outside the rules (e.g. a collapsing loss scale)."""
        self._record_events([event])
        return dispatch([event], self.config.policies)

    def tensors_for_check(self, n_tensors: int) -> list[int]:
        """Round-robin window of tensors for the next check (all when they fit ``num_params``)."""
        return round_robin(n_tensors, self.config.num_params, self.checks_done)

    def flush(self) -> None:
        """Flush the JSON-lines file."""
        if self.jsonl is not None:
            self.jsonl.flush()

    def close(self) -> None:
        """Close the JSON-lines file."""
        if self.jsonl is not None:
            self.jsonl.close()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Resumable state: schedule position, patience counters, counts."""
        return {
            "schedule": self.schedule.state_dict(),
            "health": self.health.state_dict() if self.health is not None else None,
            "checks_done": self.checks_done,
            "skipped_steps": self.skipped_steps,
            "events_dropped": self.events_dropped,
            "pending_norms": {
                "names": list(self._block_names),
                "steps": list(self._block_steps),
                "norms": self._block[: len(self._block_steps)].tolist(),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.schedule.load_state_dict(dict(state.get("schedule", {})))
        self.checks_done = int(state.get("checks_done", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.events_dropped = int(state.get("events_dropped", 0))
        health = state.get("health")
        if health is not None:
            if self.health is None:  # shapes come with start(), which keeps this state
                self.health = HealthMonitor({}, self.config.thresholds)
            self.health.load_state_dict(health)
        pending = state.get("pending_norms") or {}
        if pending.get("steps"):
            self._pending_rows = [
                (int(step), dict(zip(pending["names"], row, strict=True)))
                for step, row in zip(pending["steps"], pending["norms"], strict=True)
            ]
