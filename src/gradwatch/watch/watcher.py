"""The framework-free half of every callback: health rules, schedule, records, sinks, actions.

A callback (Lightning, Keras) owns a :class:`Watcher`. It hands it what the framework measured —
gradient norms, check reports, skipped steps — and carries out the returned
:class:`~gradwatch.core.policy.Action`. The watcher alone decides what is written, when, and by
which rank, and writes it through its :class:`~gradwatch.watch.sinks.Sink` objects. It keeps the
health rules' feed in :mod:`~gradwatch.watch.health_feed` and its records in :mod:`~gradwatch.watch.run_log`.

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

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gradwatch.core.console import Console, user_warn
from gradwatch.core.health import SKIPPED_STEPS_EVENT, HealthMonitor, skipped_steps_event
from gradwatch.core.policy import Action, dispatch
from gradwatch.core.sampling import round_robin
from gradwatch.core.schedule import BudgetSchedule, FixedSchedule, Schedule, make_schedule
from gradwatch.core.unchecked import no_check_message, unchecked_event
from gradwatch.options import WatchConfig
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch.health_feed import HEALTH_BLOCK, HealthFeed, zero_labels
from gradwatch.watch.records import WatchRecords, global_norm, merge_rank_events, new_run_id
from gradwatch.watch.run_log import MAX_EVENTS, MAX_REPORTS, RunLog, run_meta
from gradwatch.watch.sinks import Sink

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

#: Training-step durations the distributed check plan averages over.
STEP_TIMES = 50


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
        self._log = RunLog(self.meta)  # the sinks, and the records kept in memory
        self.log_every = 50 if config.log_every_n_steps is None else config.log_every_n_steps
        self.reset()

    def reset(self) -> None:
        """A fresh run: a new run id; records, schedule, health rules, check switch as constructed."""
        #: This run's id, in every record (a resumed run gets it back from ``load_state_dict``).
        self.run = new_run_id()
        self.console.reset()
        self._log.reset()
        self._warned: set[str] = set()
        self._unchecked: set[str] = set()
        self.steps_seen = 0
        self.schedule: Schedule = make_schedule(
            self.config.check_every_n_steps, self.config.max_overhead
        )
        self.numels: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}
        self.checks_done = 0
        self.checks_on = self.config.enable_checks
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.next_check: int | None = None  # agreed across ranks (distributed only)
        self._step_times: deque[float] = deque(maxlen=STEP_TIMES)
        # The health rules and the norm observations waiting for them (see observe_norms).
        self._feed = HealthFeed(
            self.config.thresholds, self.rms_scale, self.explode_limits, self._write_row
        )

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
        self._log.open(sinks, writer=writer, jsonl_path=self.config.jsonl_path)
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
        self._feed.start(shapes)

    def meta(self) -> dict[str, Any]:
        """Id, shapes and thresholds of this run, written first so ``inspect`` can judge the norms."""
        return run_meta(self.run, self.shapes, self.config)

    # -- records -------------------------------------------------------------------------------
    @property
    def sinks(self) -> list[Sink]:
        """Where records go (set by :meth:`open`)."""
        return self._log.sinks

    @property
    def writer(self) -> bool:
        """Whether this process writes records and announces (rank zero; set by :meth:`open`)."""
        return self._log.writer

    @property
    def reports(self) -> list[CheckReport]:
        """The latest :data:`MAX_REPORTS` check reports."""
        return list(self._log.reports)

    @property
    def events(self) -> list[GradientEvent]:
        """Events, the first :data:`MAX_EVENTS` of them (``events_dropped`` counts the rest)."""
        return list(self._log.events)

    @property
    def event_counts(self) -> dict[str, int]:
        """Events of this run per kind, all of them (beyond :data:`MAX_EVENTS` too)."""
        return dict(self._log.event_counts)

    @property
    def events_dropped(self) -> int:
        """Events beyond :data:`MAX_EVENTS`, counted but not kept."""
        return self._log.dropped

    def _record(self, events: Sequence[GradientEvent], report: CheckReport | None = None) -> Action:
        self._log.keep(events)
        return dispatch(
            [e for e in events if self._log.first_of_its_reason(e)],
            self.config.policies,
            report,
            announce=self.writer,
            console=self.console,
        )

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

        Judged in blocks of up to :data:`HEALTH_BLOCK` steps (when each rule acts:
        :class:`~gradwatch.watch.health_feed.HealthFeed`); :meth:`flush_health` judges the last.
        """
        written = self.writes(step)
        if written:
            self._log.write_norms(step, norms)
        events = self._prepare(norms)
        events.extend(self._feed.add_row(step, norms, written))
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
        events.extend(self._feed.add_rows([int(x) for x in steps], tuple(names), rows, written))
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
        if self._feed.health is None:
            self.start({k: (self.numels.get(k, 1),) for k in norms})
        assert self._feed.health is not None
        self._feed.health.observe_weights(norms)

    def _write_row(self, step: int, names: tuple[str, ...], row: npt.NDArray[np.float64]) -> None:
        if self.writer:
            self._log.write_norms(step, dict(zip(names, row.tolist(), strict=True)))

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
            self._log.write(lambda sink: sink.write_histograms(step, arrays), step)

    def _prepare(self, names: Iterable[str]) -> list[GradientEvent]:
        """Health rules ready for these tensors; the events of rows a checkpoint carried."""
        if self._feed.health is None:
            self.start({k: (self.numels.get(k, 1),) for k in names})
        return self._feed.restored()

    def flush_health(self) -> tuple[list[GradientEvent], Action]:
        """Judge the observations still waiting in the current block (call at the end of training)."""
        events = self._feed.judge()
        return events, self._record(events)

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
        self._log.write(lambda sink: sink.write_schedule(step, decision), step)
        if report is None:
            return self._record(list(events or ()))
        self._log.reports.append(report)
        self.checks_done += 1
        if self._feed.health is not None:
            self._feed.health.mark_zero(zero_labels(report))
        self._log.write(lambda sink: sink.write_report(report), step)
        return self._record(list(report.events if events is None else events), report)

    # -- output --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Flush every sink (before a raise, at the end of training)."""
        self._log.flush()

    def close(self) -> None:
        """Close every sink."""
        self._log.close()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Resumable state: run id, schedule position, patience counters, counts."""
        feed = self._feed.state_dict()
        return {
            "run": self.run,
            "event_counts": dict(self._log.event_counts),
            "schedule": self.schedule.state_dict(),
            "health": feed["health"],
            "checks_done": self.checks_done,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "events_dropped": self._log.dropped,
            "next_check": self.next_check,
            "pending_norms": feed["pending_norms"],
        }

    def hold_rows(
        self, steps: Sequence[int], names: Sequence[str], rows: Sequence[Sequence[float]]
    ) -> None:
        """Norm rows observed but not judged yet (a checkpoint's): judged before the next ones."""
        self._feed.hold_rows(steps, names, rows)

    @property
    def health(self) -> HealthMonitor | None:
        """The health rules (``None`` until the tensors are known)."""
        return self._feed.health

    @property
    def _pending_rows(self) -> list[tuple[int, dict[str, float]]]:
        """Rows a checkpoint carried, not judged yet (:meth:`hold_rows`)."""
        return self._feed.pending_rows

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the constructor's arguments always win)."""
        run = state.get("run")  # 0.1 checkpoints have none: the run keeps its new id
        if run is not None and str(run) != self.run:
            self.run = str(run)
            self._log.meta_written = False  # the next record announces the resumed run
        counts = state.get("event_counts") or {}
        self._log.event_counts = {str(k): int(v) for k, v in counts.items()}
        self.schedule.load_state_dict(dict(state.get("schedule", {})))
        self.checks_done = int(state.get("checks_done", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self._log.dropped = int(state.get("events_dropped", 0))
        self.next_check = state.get("next_check", state.get("next_due"))  # 0.1: next_due
        self._feed.load_state_dict(state)
