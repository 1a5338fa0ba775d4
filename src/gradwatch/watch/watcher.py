"""The framework-free half of every callback: health rules, schedule, records, sinks, actions.

A callback (Lightning, Keras) owns a :class:`Watcher`. It hands it what the framework measured —
gradient norms, check reports, skipped steps — and carries out the returned
:class:`~gradwatch.core.policy.Action`. The watcher alone decides what is written, when, and by
which rank, and writes it through its :class:`~gradwatch.watch.sinks.Sink` objects.

Steps: every record is labelled with the framework's own step (``step``); which steps are
sampled is decided on the 1-based optimizer-step count, ``count = step - first_step + 1``:

* norms feed the health rules when ``(count - 1) % norm_every_n_steps == 0`` (the first step
  always);
* norms are written when ``count % log_every == 0`` (Lightning's own rule), and always for a step
  that has an event; ``log_every = 0`` writes no periodic norms;
* a check is due when the schedule says so for the 0-based index ``count - 1``, or — under
  distributed training — at the step all ranks agreed on.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gradwatch.core.console import Console, user_warn
from gradwatch.core.health import (
    SKIPPED_STEPS_EVENT,
    HealthMonitor,
    skipped_steps_event,
)
from gradwatch.core.policy import Action, dispatch
from gradwatch.core.sampling import round_robin
from gradwatch.core.schedule import BudgetSchedule, FixedSchedule, Schedule, make_schedule
from gradwatch.core.unchecked import no_check_message, unchecked_event
from gradwatch.options import WatchConfig
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch.records import (
    WatchRecords,
    global_norm,
    merge_rank_events,
    new_run_id,
    write_event,
    write_event_counts,
)
from gradwatch.watch.sinks import JsonlSink, Sink

__all__ = [
    "HEALTH_BLOCK",
    "MAX_EVENTS",
    "MAX_REPORTS",
    "WatchRecords",
    "Watcher",
    "global_norm",
    "merge_rank_events",
    "zero_labels",
]

logger = logging.getLogger("gradwatch")

#: Reports kept in memory (the latest); events kept (the first), with a count of the rest.
MAX_REPORTS = 100
MAX_EVENTS = 10_000
#: Norm observations judged together (a block): the health rules' per-step cost is paid once per
#: block. A non-finite or above-threshold value is judged at once, whatever the block holds.
HEALTH_BLOCK = 16
#: Training-step durations the distributed check plan averages over.
STEP_TIMES = 50


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


class Watcher:
    """Health rules, schedule, bounded records and the sinks of one training run.

    Args:
        config: Validated configuration.
        first_step: The framework's label of the first optimizer step (Lightning 0, Keras 1).
        framework: Whose words the messages use (``"lightning"``, ``"keras"``).

    What reaches the console goes through :attr:`console` on the writer (rank zero) only: one
    warning per group of events, attributed to the user's code, and one line for a halt.

    Example:
        >>> w = Watcher(WatchConfig.create(), first_step=1)
        >>> w.open([], log_every=5)
        >>> w.writes(5), w.writes(6), w.check_due(1)
        (True, False, True)
    """

    def __init__(
        self, config: WatchConfig, *, first_step: int = 0, framework: str | None = None
    ) -> None:
        self.config = config
        self.first_step = first_step
        self.framework = framework
        self.console = Console()
        self.sinks: list[Sink] = []
        self.writer = True
        self.log_every = 50 if config.log_every_n_steps is None else config.log_every_n_steps
        self.reset()

    def reset(self) -> None:
        """A fresh run: a new run id; records, schedule, health rules, check switch as constructed."""
        #: This run's id, in every record (a resumed run gets it back from ``load_state_dict``).
        self.run = new_run_id()
        self.console.reset()
        self._event_counts: dict[str, int] = {}
        self._warned: set[str] = set()
        self._unchecked: set[str] = set()
        self._unchecked_reasons: set[str] = set()
        self.steps_seen = 0
        self.schedule: Schedule = make_schedule(
            self.config.check_every_n_steps, self.config.max_overhead
        )
        self.health: HealthMonitor | None = None
        self.numels: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}
        self._meta_written = False
        self._reports: deque[CheckReport] = deque(maxlen=MAX_REPORTS)
        self._events: list[GradientEvent] = []
        self.events_dropped = 0
        self.checks_done = 0
        self.checks_on = self.config.enable_checks
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.next_check: int | None = None  # agreed across ranks (distributed only)
        self._step_times: deque[float] = deque(maxlen=STEP_TIMES)
        # Norm observations waiting to be judged (see observe_norms).
        self._block_names: tuple[str, ...] = ()
        self._block_steps: list[int] = []
        self._block_written: list[bool] = []
        self._block = np.empty((HEALTH_BLOCK, 0))
        self._block_scale = np.ones(0)
        self._block_limit = np.ones(0)
        self._limit_list: list[float] = []
        self._pending_rows: list[tuple[int, dict[str, float]]] = []

    def open(
        self, sinks: Sequence[Sink], *, writer: bool = True, log_every: int | None = None
    ) -> None:
        """Where records go for this run, and whether this process writes them (rank zero).

        Args:
            sinks: The run's sinks; a ``jsonl_path`` in the config adds a :class:`JsonlSink`.
            writer: ``False`` on every rank but zero: records are kept, nothing is written or
                announced.
            log_every: Write norms every this many optimizer steps (``config.log_every_n_steps``
                wins when set; ``0`` writes no periodic norms).
        """
        self.close()
        self.sinks = list(sinks)
        if self.config.jsonl_path:
            self.sinks.append(JsonlSink(self.config.jsonl_path))
        self.writer = writer
        if self.config.log_every_n_steps is not None:
            self.log_every = self.config.log_every_n_steps
        elif log_every is not None:
            self.log_every = max(0, int(log_every))

    # -- what is sampled -----------------------------------------------------------------------
    def count(self, step: int) -> int:
        """The 1-based optimizer-step count of a step label."""
        return step - self.first_step + 1

    def observes(self, step: int) -> bool:
        """Whether the health rules take this step's norms (``norm_every_n_steps``)."""
        return (
            self.config.enable_norms
            and (self.count(step) - 1) % self.config.norm_every_n_steps == 0
        )

    def writes(self, step: int) -> bool:
        """Whether this step's norms are written (every ``log_every`` steps, on the writer).

        With ``norm_every_n_steps = k > 1`` only every k-th step has norms; the one written is the
        first observed step at or after each multiple of ``log_every`` (the window of the last k
        steps holds the multiple), so the two periods never miss each other.
        """
        n = self.log_every
        if not self.writer or n <= 0:
            return False
        count = self.count(step)
        return count // n != max(0, count - self.config.norm_every_n_steps) // n

    def check_due(self, step: int) -> bool:
        """Whether a check runs at this step."""
        if not self.checks_on:
            return False
        if self.next_check is not None:
            return step >= self.next_check
        return self.schedule.due(self.count(step) - 1)

    def tensors_for_check(self, n_tensors: int) -> list[int]:
        """Round-robin window of tensors for the next check (all when they fit ``num_params``)."""
        return round_robin(n_tensors, self.config.num_params, self.checks_done)

    # -- tensors and meta ----------------------------------------------------------------------
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
        """Id, shapes and thresholds of this run, written first so ``inspect`` can judge the norms."""
        from gradwatch.core.finite_diff import tolerances_for

        dtype = self.config.dtype or "float32"
        th = self.config.thresholds
        return {
            "run": self.run,
            "shapes": dict(self.shapes),
            "vanish_threshold": th.vanish_threshold,
            "explode_threshold": th.explode_threshold,
            "rtol": self.config.rtol or tolerances_for(dtype).rtol,
        }

    def _write(self, what: Callable[[Sink], None], step: int) -> None:
        if not self.writer or not self.sinks:
            return
        if not self._meta_written:
            self._meta_written = True
            meta = self.meta()
            for sink in self.sinks:
                sink.write_meta(step, meta)
        for sink in self.sinks:
            what(sink)

    # -- records -------------------------------------------------------------------------------
    @property
    def reports(self) -> list[CheckReport]:
        """The latest :data:`MAX_REPORTS` check reports."""
        return list(self._reports)

    @property
    def events(self) -> list[GradientEvent]:
        """Events, the first :data:`MAX_EVENTS` of them (``events_dropped`` counts the rest)."""
        return list(self._events)

    @property
    def event_counts(self) -> dict[str, int]:
        """Events of this run per kind, all of them (beyond :data:`MAX_EVENTS` too)."""
        return dict(self._event_counts)

    def _record(self, events: Sequence[GradientEvent], report: CheckReport | None = None) -> Action:
        for e in events:
            if len(self._events) < MAX_EVENTS:
                self._events.append(e)
            else:
                self.events_dropped += 1
            self._write(functools.partial(write_event, event=e), e.step)
        if events:
            self._count(events)
        return dispatch(
            [e for e in events if self._first_of_its_reason(e)],
            self.config.policies,
            report,
            announce=self.writer,
            console=self.console,
        )

    def _first_of_its_reason(self, event: GradientEvent) -> bool:
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
            n = self._event_counts[e.kind] = self._event_counts.get(e.kind, 0) + 1
            at_step.setdefault(e.step, {})[e.kind] = n
        for step, counts in at_step.items():
            self._write(functools.partial(write_event_counts, step=step, counts=counts), step)

    def unchecked(self, step: int, key: str, message: str) -> Action:
        """A check that could not run: one ``unchecked`` event per ``key`` (reason) and run.

        The event goes through the normal event path (every sink, the counts, the policy, which
        always warns and never halts or raises). ``message`` is the reason and the fix in one
        sentence.
        """
        if key in self._unchecked:
            return Action()
        self._unchecked.add(key)
        return self._record([unchecked_event(step, message)])

    def finish_checks(self, step: int) -> Action:
        """At the end of training: a run with checks enabled in which no check ran says so.

        One ``unchecked`` event, unless an earlier ``unchecked`` event of this run already said why
        (or no optimizer step ran at all).
        """
        if (
            not self.config.enable_checks
            or self.checks_done > 0
            or self._unchecked
            or self.steps_seen == 0
        ):
            return Action()
        period = self.schedule.period if isinstance(self.schedule, FixedSchedule) else None
        return self.unchecked(
            step, "no-check", no_check_message(self.steps_seen, period, self.framework)
        )

    def warn_once(self, key: str, message: str) -> None:
        """One ``UserWarning`` per ``key`` (rank zero) for what gradwatch had to skip, attributed
        to the user's code; an INFO log record beside it."""
        if key in self._warned or not self.writer:
            return
        self._warned.add(key)
        logger.info(message)
        user_warn(message, UserWarning)

    def announce_halt(self, step: int, action: Action, *, ended: bool = False) -> None:
        """The one line of a halt, on the writer, once per run: gradwatch stopped training at
        ``step``, and why (``action.reason``). ``ended``: training was ending anyway."""
        if action.halt and self.writer:
            self.console.halt(step, action.reason, since=action.since, ended=ended)

    # -- norms ---------------------------------------------------------------------------------
    def observe_norms(
        self, step: int, norms: Mapping[str, float]
    ) -> tuple[list[GradientEvent], Action]:
        """Feed the L2 norms of one optimizer step; returns the events that start now and the action.

        Observations are judged in blocks of up to :data:`HEALTH_BLOCK` steps (same events, same
        steps, as one at a time); a non-finite norm or one above ``explode_threshold`` is judged
        at once, so ``nonfinite`` and absolute ``exploding`` act on the step they name. Vanishing
        (which needs ``patience`` steps anyway) and sudden jumps act when their block is judged:
        at most ``HEALTH_BLOCK - 1`` steps later, and at the end of training (:meth:`flush_health`).
        """
        written = self.writes(step)
        if written:
            self._write_norms(step, norms)
        events = self._prepare(norms)
        events.extend(self._add_row(step, norms, written))
        return events, self._record(events)

    def observe_norm_rows(
        self, steps: Sequence[int], names: Sequence[str], rows: npt.NDArray[np.float64]
    ) -> tuple[list[GradientEvent], Action]:
        """:meth:`observe_norms` for several steps read at once (row ``i`` is step ``steps[i]``)."""
        written = [self.writes(int(s)) for s in steps]
        for i, w in enumerate(written):
            if w:
                self._write_row(int(steps[i]), tuple(names), rows[i])
        events = self._prepare(names)
        events.extend(self._add_rows([int(x) for x in steps], tuple(names), rows, written))
        return events, self._record(events)

    def observe_weight_norms(self, norms: Mapping[str, float]) -> None:
        """The weights' L2 norms (name → ``‖w‖``), for the relative vanishing rule.

        Callbacks hand them once per block, read with the block's gradient norms; the rows
        judged next use them (weights move little within a block).

        Example:
            >>> w = Watcher(WatchConfig.create(), first_step=1)
            >>> w.start({"fc.weight": (2, 2)})
            >>> w.observe_weight_norms({"fc.weight": 1.0})
        """
        if self.health is None:
            self.start({k: (self.numels.get(k, 1),) for k in norms})
        assert self.health is not None
        self.health.observe_weights(norms)

    def _write_row(self, step: int, names: tuple[str, ...], row: npt.NDArray[np.float64]) -> None:
        self._write_norms(step, dict(zip(names, row.tolist(), strict=True)))

    def _write_norms(self, step: int, norms: Mapping[str, float]) -> None:
        total = global_norm(norms)  # once, whatever the number of sinks
        self._write(lambda sink: sink.write_norms(step, norms, total), step)

    def rms_scale(self, names: Sequence[str]) -> npt.NDArray[np.float64]:
        """``√numel`` of each tensor: a norm divided by it is the gradient's RMS."""
        return np.array([math.sqrt(max(1, self.numels.get(k, 1))) for k in names])

    def explode_limits(self, names: Sequence[str]) -> npt.NDArray[np.float64]:
        """Each tensor's norm above which it is exploding (RMS above ``explode_threshold``): the
        one limit the health rules, the callbacks' per-step calm tests and their guards share."""
        return self.rms_scale(names) * self.config.thresholds.explode_threshold

    def write_histograms(
        self, step: int, values: Callable[[], Mapping[str, npt.ArrayLike]]
    ) -> None:
        """Gradient histograms at a writing step (``values`` is called only if something writes)."""
        if self.writes(step) and any(getattr(s, "wants_histograms", True) for s in self.sinks):
            arrays = values()
            self._write(lambda sink: sink.write_histograms(step, arrays), step)

    def _prepare(self, names: Iterable[str]) -> list[GradientEvent]:
        """Health rules ready for these tensors; the events of rows a checkpoint carried."""
        if self.health is None:
            self.start({k: (self.numels.get(k, 1),) for k in names})
        events: list[GradientEvent] = []
        restored, self._pending_rows = self._pending_rows, []
        for old_step, old_norms in restored:  # judged before the new rows, in step order
            events.extend(self._add_row(old_step, old_norms, True))
        return events

    def _add_row(self, step: int, norms: Mapping[str, float], written: bool) -> list[GradientEvent]:
        filled = len(self._block_steps)
        if filled < HEALTH_BLOCK and tuple(norms) == self._block_names:
            # The every-step path: a row into the block, an urgency test in plain Python.
            values = list(norms.values())
            self._block[filled] = values
            self._block_steps.append(step)
            self._block_written.append(written)
            calm = all(x <= lim for x, lim in zip(values, self._limit_list, strict=True))
            if filled + 1 == HEALTH_BLOCK or not calm:  # NaN is never <= a limit
                return self._judge_block()
            return []
        row = np.fromiter(norms.values(), dtype=np.float64, count=len(norms))
        return self._add_rows([step], tuple(norms), row[None, :], [written])

    def _add_rows(
        self,
        steps: list[int],
        names: tuple[str, ...],
        rows: npt.NDArray[np.float64],
        written: list[bool],
    ) -> list[GradientEvent]:
        events: list[GradientEvent] = []
        if names != self._block_names:
            events.extend(self._judge_block())
            self._block_names = names
            self._block_scale = self.rms_scale(names)
            self._block_limit = self.explode_limits(names)
            self._limit_list = self._block_limit.tolist()
            self._block = np.empty((HEALTH_BLOCK, len(names)))
        start = 0
        while start < len(steps):
            filled = len(self._block_steps)
            chunk = rows[start : start + HEALTH_BLOCK - filled]
            k = len(chunk)
            self._block[filled : filled + k] = chunk
            self._block_steps.extend(steps[start : start + k])
            self._block_written.extend(written[start : start + k])
            if len(self._block_steps) == HEALTH_BLOCK or not (chunk <= self._block_limit).all():
                events.extend(self._judge_block())
            start += k
        return events

    def flush_health(self) -> tuple[list[GradientEvent], Action]:
        """Judge the observations still waiting in the current block (call at the end of training)."""
        events = self._judge_block()
        return events, self._record(events)

    def _judge_block(self) -> list[GradientEvent]:
        if not self._block_steps or self.health is None:
            return []
        k = len(self._block_steps)
        rms = self._block[:k] / self._block_scale
        steps, self._block_steps = self._block_steps, []
        written, self._block_written = self._block_written, []
        events = self.health.observe_block(steps, self._block_names, rms)
        # The norms of a step with an event are always written.
        for step in sorted({e.step for e in events}):
            if step in steps and not written[steps.index(step)] and self.writer:
                self._write_row(step, self._block_names, self._block[steps.index(step)])
        return events

    def observe_skipped_step(self, step: int, skipped: bool, scale: float, scaler: str) -> Action:
        """A step a loss scaler skipped (overflow) or applied; a run of skips is an event."""
        if not skipped:
            self.consecutive_skips = 0
            return Action()
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips != SKIPPED_STEPS_EVENT:
            return Action()
        return self._record([skipped_steps_event(step, self.consecutive_skips, scale, scaler)])

    def observe_skip_run(
        self, step: int, total: int, run: int, scale: float, scaler: str
    ) -> Action:
        """:meth:`observe_skipped_step` from counts read in blocks: ``total`` skips this run, the
        last ``run`` of them in a row (an in-graph loss scaler's)."""
        self.skipped_steps = max(self.skipped_steps, int(total))
        before, self.consecutive_skips = self.consecutive_skips, int(run)
        if before < SKIPPED_STEPS_EVENT <= run:
            return self._record([skipped_steps_event(step, int(run), scale, scaler)])
        return Action()

    # -- checks --------------------------------------------------------------------------------
    def disable_checks(self, step: int, reason: str, fix: str) -> Action:
        """A check could not run: checks are off for the rest of the run (norms go on).

        Args:
            step: The step of the check.
            reason: What went wrong (the error).
            fix: What the user can do, as an imperative clause.

        Returns:
            The action of the ``unchecked`` event it records (it never halts or raises).
        """
        self.checks_on = False
        return self.unchecked(
            step,
            "check-error",
            f"the gradient check at step {step} could not run ({reason}), so checks are switched "
            f"off for the rest of the run and norms go on: {fix}",
        )

    def record_step(self, seconds: float) -> None:
        """Measured duration of one training step, check time excluded."""
        self.schedule.record_step(seconds)
        self._step_times.append(seconds)
        self.steps_seen += 1

    def plan_next_check(self, step: int, seconds: float) -> int | None:
        """After a check of ``seconds`` at ``step``: the step of the next one, on this rank's clock.

        Distributed callbacks take rank zero's plan (:meth:`agree_next_check`), so every rank checks
        at the same step; ``None`` for a fixed period (every rank computes the same steps).
        """
        if not isinstance(self.schedule, BudgetSchedule):
            return None
        probe = BudgetSchedule(self.schedule.max_overhead)
        probe.record_check(seconds)
        mean = sum(self._step_times) / len(self._step_times) if self._step_times else 0.0
        return step + probe.steps_until_due(mean)

    def agree_next_check(self, step: int | None) -> None:
        """The next check's step as all ranks agreed on it (``None``: the schedule decides)."""
        self.next_check = step

    def observe_report(
        self,
        report: CheckReport | None,
        step: int,
        seconds: float,
        events: Sequence[GradientEvent] | None = None,
    ) -> Action:
        """Record a check (``None``: it was skipped), its events and the schedule decision.

        Args:
            report: The check's report, or ``None`` when no check ran.
            step: The step of the check.
            seconds: Its duration (fed to the schedule).
            events: The events to record instead of the report's own (a distributed check:
                every rank's events, merged).
        """
        self.schedule.record_check(seconds)
        decision = self.schedule.explain()
        if self.next_check is not None:
            decision = f"{decision}; all ranks check next at step {self.next_check}"
        if self.writer:
            logger.info("gradwatch: step %d: %s", step, decision)
        self._write(lambda sink: sink.write_schedule(step, decision), step)
        if report is None:
            return self._record(list(events or ()))
        self._reports.append(report)
        self.checks_done += 1
        if self.health is not None:
            self.health.mark_zero(zero_labels(report))
        self._write(lambda sink: sink.write_report(report), step)
        return self._record(list(report.events if events is None else events), report)

    # -- output --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Flush every sink (before a raise, at the end of training)."""
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            sink.close()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Resumable state: run id, schedule position, patience counters, counts."""
        return {
            "run": self.run,
            "event_counts": dict(self._event_counts),
            "schedule": self.schedule.state_dict(),
            "health": self.health.state_dict() if self.health is not None else None,
            "checks_done": self.checks_done,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "events_dropped": self.events_dropped,
            "next_check": self.next_check,
            "pending_norms": {
                "names": list(self._block_names),
                "steps": list(self._block_steps),
                "norms": self._block[: len(self._block_steps)].tolist(),
            },
        }

    def hold_rows(
        self, steps: Sequence[int], names: Sequence[str], rows: Sequence[Sequence[float]]
    ) -> None:
        """Norm rows observed but not judged yet (a checkpoint's): judged before the next ones."""
        self._pending_rows.extend(
            (int(step), dict(zip(names, row, strict=True)))
            for step, row in zip(steps, rows, strict=True)
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the constructor's arguments always win)."""
        run = state.get("run")  # 0.1 checkpoints have none: the run keeps its new id
        if run is not None and str(run) != self.run:
            self.run = str(run)
            self._meta_written = False  # the next record announces the resumed run
        self._event_counts = {str(k): int(v) for k, v in (state.get("event_counts") or {}).items()}
        self.schedule.load_state_dict(dict(state.get("schedule", {})))
        self.checks_done = int(state.get("checks_done", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.events_dropped = int(state.get("events_dropped", 0))
        self.next_check = state.get("next_check", state.get("next_due"))  # 0.1: next_due
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
