"""What one run read back holds: norms, relative errors, events, meta — and the runs of a folder.

:class:`RunData` is what :func:`~gradwatch.inspect.read.load` returns for each run; the readers of
:mod:`~gradwatch.inspect.log_formats` fill it, one :class:`FolderRuns` per folder, keyed by the run
ids the records carry.

Example:
    >>> parse_grad_norm_tag("grad_2.0_norm/layer.weight")
    'layer.weight'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gradwatch.core.finite_diff import tolerances_for
from gradwatch.core.health import HealthThresholds
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch import tags

__all__ = ["FolderRuns", "InspectError", "RunData", "parse_grad_norm_tag"]

_FOREIGN_NORM = re.compile(r"^grad_(?:[0-9.]+|inf)_norm(?:/(.+)|_total)$")


class InspectError(Exception):
    """A usage or input problem: one clear line for the user, exit status 2."""


def parse_grad_norm_tag(tag: str) -> str | None:
    """Parameter of a Lightning ``grad_norm`` tag (``"global"`` for the total), else ``None``.

    Example:
        >>> parse_grad_norm_tag("grad_2.0_norm_total"), parse_grad_norm_tag("train_loss")
        ('global', None)
    """
    m = _FOREIGN_NORM.match(tag)
    if m is None:
        return None
    name = m.group(1) or tags.GLOBAL_NAME
    for suffix in ("_step", "_epoch"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


@dataclass
class RunData:
    """Everything read for one run.

    Attributes:
        name: Path of the run folder relative to the inspected path (``"."`` for the path itself),
            followed by ``#<run id>`` when the folder holds several runs.
        norms: Parameter → ``{step: gradient L2 norm}`` (``"global"`` included).
        rel_errors: Parameter → ``{step: worst relative error}`` (``"max"`` included).
        events: Recorded events, or, for foreign norms, events found by the health rules.
        meta: Shapes and thresholds written by gradwatch, if any.
        foreign: Norms came from logs gradwatch did not write.
        run_id: The id gradwatch gave the run (``None`` for 0.1 and foreign logs).
        event_counts: Kind → the highest running count of ``gradwatch/events/<kind>`` scalars
            (the only trace of events in a CSV log).
    """

    name: str
    norms: dict[str, dict[int, float]] = field(default_factory=dict)
    rel_errors: dict[str, dict[int, float]] = field(default_factory=dict)
    events: list[GradientEvent] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    foreign: bool = False
    run_id: str | None = None
    event_counts: dict[str, int] = field(default_factory=dict)

    @property
    def rtol(self) -> float:
        """The tolerance the run's checks were judged against (the float64 default if unknown)."""
        return float(self.meta.get("rtol", tolerances_for("float64").rtol))

    @property
    def vanish_threshold(self) -> float:
        """The run's vanishing threshold (the callbacks' default if unknown)."""
        return float(self.meta.get("vanish_threshold", HealthThresholds.vanish_threshold))

    @property
    def explode_threshold(self) -> float:
        """The run's exploding threshold (the callbacks' default if unknown)."""
        return float(self.meta.get("explode_threshold", HealthThresholds.explode_threshold))

    @property
    def has_data(self) -> bool:
        return bool(self.norms or self.rel_errors or self.events or self.event_counts)

    def kind_counts(self) -> dict[str, int]:
        """Events per kind: the recorded events, or the count scalars where they say more.

        Example:
            >>> RunData("r", event_counts={"mismatch": 2}).kind_counts()
            {'mismatch': 2}
        """
        counts: dict[str, int] = {}
        for e in self.events:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        for kind, n in self.event_counts.items():
            counts[kind] = max(counts.get(kind, 0), n)
        return counts

    def undetailed_counts(self) -> dict[str, int]:
        """Events per kind that the count scalars report but no event record describes."""
        recorded: dict[str, int] = {}
        for e in self.events:
            recorded[e.kind] = recorded.get(e.kind, 0) + 1
        return {
            kind: n - recorded.get(kind, 0)
            for kind, n in self.event_counts.items()
            if n > recorded.get(kind, 0)
        }

    def add_report(self, report: CheckReport) -> None:
        """The worst relative error per tensor (and the maximum) of one check."""
        step = report.step if report.step is not None else -1
        for name, value in report.worst_by_param().items():
            series = self.rel_errors.setdefault(name, {})
            series[step] = max(series.get(step, 0.0), value)
        if report.max_rel_error is not None:
            self.rel_errors.setdefault(tags.MAX_NAME, {})[step] = report.max_rel_error

    def add_event(self, event: GradientEvent) -> None:
        key = (event.step, event.kind, event.param, event.message)
        if all((e.step, e.kind, e.param, e.message) != key for e in self.events[-64:]):
            self.events.append(event)

    def absorb(self, other: RunData) -> None:
        """Take in the records of ``other``, written after this run's (its meta wins)."""
        for target, source in ((self.norms, other.norms), (self.rel_errors, other.rel_errors)):
            for name, series in source.items():
                target.setdefault(name, {}).update(series)
        for event in other.events:
            self.add_event(event)
        for kind, n in other.event_counts.items():
            self.event_counts[kind] = max(self.event_counts.get(kind, 0), n)
        self.meta.update(other.meta)
        self.foreign = self.foreign or other.foreign
        self.run_id = self.run_id or other.run_id


class FolderRuns:
    """The runs of one folder, keyed by run id (``None``: records without one), in written order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.by_id: dict[str | None, RunData] = {}

    def get(self, run_id: Any) -> RunData:
        key = None if run_id is None else str(run_id)
        data = self.by_id.get(key)
        if data is None:
            data = self.by_id[key] = RunData(name=self.name, run_id=key)
        return data

    def runs(self) -> list[RunData]:
        """One run when at most one id was seen (as 0.1 read it); else one per id."""
        ids = [k for k in self.by_id if k is not None]
        if len(ids) <= 1:
            merged, *rest = self.by_id.values() or [RunData(name=self.name)]
            for data in rest:  # in written order
                merged.absorb(data)
            return [merged]
        for run_id, data in self.by_id.items():
            if run_id is not None:
                data.name = f"{self.name}#{run_id}"
        return list(self.by_id.values())
