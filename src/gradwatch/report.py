"""Records: what a check found (:class:`CheckReport`) and what happened to gradients (:class:`GradientEvent`).

The records are frozen dataclasses of plain Python numbers, so they pickle, compare and
serialise without any ML framework. ``to_dict()`` gives JSON-ready dictionaries in which
non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "EVENT_KINDS",
    "CheckReport",
    "EntryResult",
    "EventKind",
    "GradientEvent",
    "Status",
    "Verdict",
    "json_float",
    "parse_float",
]

Verdict = Literal["pass", "fail", "inconclusive"]
Status = Literal["ok", "mismatch", "disconnected", "kink", "zero"]
EventKind = Literal["mismatch", "disconnected", "vanishing", "exploding", "nonfinite", "unchecked"]

#: Every event kind, in the order the docs list them.
EVENT_KINDS: tuple[str, ...] = (
    "mismatch",
    "disconnected",
    "vanishing",
    "exploding",
    "nonfinite",
    "unchecked",
)

STATUSES: tuple[str, ...] = ("ok", "mismatch", "disconnected", "kink", "zero")


def json_float(value: float | None) -> float | str | None:
    """Return ``value`` as JSON allows it: non-finite numbers become strings.

    Example:
        >>> json_float(float("inf")), json_float(0.5), json_float(None)
        ('inf', 0.5, None)
    """
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def parse_float(value: Any) -> float | None:
    """Inverse of :func:`json_float`.

    Example:
        >>> parse_float("-inf"), parse_float(2), parse_float(None)
        (-inf, 2.0, None)
    """
    if value is None:
        return None
    return float(value)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}"


@dataclass(frozen=True)
class EntryResult:
    """One checked coordinate (``index`` set) or one random direction (``index is None``).

    Attributes:
        param: Parameter name, as the framework names it.
        index: Coordinate inside the tensor, or ``None`` for a direction.
        analytic: What autodiff computed (the directional derivative for a direction).
        numeric: The central finite-difference estimate.
        rel_error: ``|analytic - numeric| / max(|analytic|, |numeric|, floor)``; ``None`` when
            the entry carries no information (status ``zero`` or ``kink``).
        status: ``ok``, ``mismatch``, ``disconnected``, ``kink`` (non-smooth point, resampled)
            or ``zero`` (both sides below finite-difference resolution).
    """

    param: str
    index: tuple[int, ...] | None
    analytic: float
    numeric: float
    rel_error: float | None
    status: Status

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "param": self.param,
            "index": list(self.index) if self.index is not None else None,
            "analytic": json_float(self.analytic),
            "numeric": json_float(self.numeric),
            "rel_error": json_float(self.rel_error),
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntryResult:
        """Inverse of :meth:`to_dict`."""
        index = data.get("index")
        return cls(
            param=str(data["param"]),
            index=tuple(int(i) for i in index) if index is not None else None,
            analytic=float(data["analytic"]),
            numeric=float(data["numeric"]),
            rel_error=parse_float(data.get("rel_error")),
            status=data["status"],
        )


@dataclass(frozen=True)
class GradientEvent:
    """Something happened to the gradients that a person should know about.

    Attributes:
        step: Optimizer step the observation belongs to.
        kind: ``mismatch``, ``disconnected``, ``vanishing``, ``exploding``, ``nonfinite`` or
            ``unchecked`` (a check that could not run, or could not judge: nothing was verified).
        param: Parameter name, or ``"global"``.
        value: The measured quantity (relative error, gradient RMS, ...).
        threshold: The threshold it crossed.
        message: One sentence a person can act on.
        module: For ``mismatch`` and ``disconnected``: the module whose own backward is wrong,
            when a localization found it (``None`` until localized, and in 0.1 logs).

    Example:
        >>> e = GradientEvent(3, "vanishing", "fc1.weight", 1e-9, 1e-7, "fc1.weight vanished")
        >>> e.to_dict()["kind"]
        'vanishing'
        >>> GradientEvent.from_dict({**e.to_dict(), "module": "fc1"}).module
        'fc1'
    """

    step: int
    kind: EventKind
    param: str
    value: float
    threshold: float
    message: str
    module: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "step": int(self.step),
            "kind": self.kind,
            "param": self.param,
            "value": json_float(self.value),
            "threshold": json_float(self.threshold),
            "message": self.message,
            "module": self.module,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradientEvent:
        """Inverse of :meth:`to_dict` (0.1 logs, which have no ``module``, read as ``None``)."""
        module = data.get("module")
        return cls(
            step=int(data["step"]),
            kind=data["kind"],
            param=str(data["param"]),
            value=float(data["value"]),
            threshold=float(data["threshold"]),
            message=str(data["message"]),
            module=None if module is None else str(module),
        )

    def __str__(self) -> str:
        return f"[step {self.step}] {self.kind} {self.param}: {self.message}"


@dataclass(frozen=True)
class CheckReport:
    """The outcome of one gradient check.

    Attributes:
        step: Optimizer step of the check (``None`` for a standalone check).
        verdict: ``pass``, ``fail`` or ``inconclusive`` (too few entries carried information).
        max_rel_error: Worst relative error over conclusive entries, ``None`` if none was.
        results: Every entry checked, kinks and zeros included.
        events: One event per failing tensor (``mismatch``/``disconnected``), or ``nonfinite``
            or ``unchecked`` (why the check could not judge).
        mode: ``coordinate``, ``directional`` or ``modules`` (entries are directions of each
            module's inputs and parameters, evaluations are of single modules).
        dtype: The dtype the check computed in.
        rtol: The tolerance the relative errors were judged against.
        evaluations: Loss evaluations used.
        seconds: Wall-clock time of the check.
        notes: Remarks a person should read (a weaker check, a skipped part).
    """

    step: int | None
    verdict: Verdict
    max_rel_error: float | None
    results: tuple[EntryResult, ...]
    events: tuple[GradientEvent, ...]
    mode: str
    dtype: str
    rtol: float
    evaluations: int
    seconds: float
    notes: tuple[str, ...] = field(default=())

    @property
    def failed(self) -> tuple[EntryResult, ...]:
        """Entries with status ``mismatch`` or ``disconnected``."""
        return tuple(r for r in self.results if r.status in ("mismatch", "disconnected"))

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the checked tensors, in the order they were checked."""
        return tuple(dict.fromkeys(r.param for r in self.results))

    def worst_by_param(self) -> dict[str, float]:
        """Worst conclusive relative error of each tensor (tensors with none are left out)."""
        worst: dict[str, float] = {}
        for r in self.results:
            if r.rel_error is None or r.status in ("kink", "zero"):
                continue
            if r.param not in worst or r.rel_error > worst[r.param]:
                worst[r.param] = r.rel_error
        return worst

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "step": self.step,
            "verdict": self.verdict,
            "max_rel_error": json_float(self.max_rel_error),
            "results": [r.to_dict() for r in self.results],
            "events": [e.to_dict() for e in self.events],
            "mode": self.mode,
            "dtype": self.dtype,
            "rtol": json_float(self.rtol),
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckReport:
        """Inverse of :meth:`to_dict`."""
        return cls(
            step=data.get("step"),
            verdict=data["verdict"],
            max_rel_error=parse_float(data.get("max_rel_error")),
            results=tuple(EntryResult.from_dict(r) for r in data.get("results", ())),
            events=tuple(GradientEvent.from_dict(e) for e in data.get("events", ())),
            mode=str(data["mode"]),
            dtype=str(data["dtype"]),
            rtol=float(data["rtol"]),
            evaluations=int(data["evaluations"]),
            seconds=float(data["seconds"]),
            notes=tuple(data.get("notes", ())),
        )

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        count_text = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts) or "none"
        where = "" if self.step is None else f" at step {self.step}"
        # mode="modules": entries are a module's inputs and parameters, evaluations of one module
        what, evaluated = ("slots", "module") if self.mode == "modules" else ("tensors", "loss")
        lines = [
            f"gradient check{where}: {self.verdict.upper()}  "
            f"(max rel error {_fmt(self.max_rel_error)}, rtol {self.rtol:g}, {self.mode}, "
            f"{self.dtype}, {len(self.params)} {what}, {self.evaluations} {evaluated} evaluations, "
            f"{self.seconds:.2f}s)",
            f"  entries: {count_text}",
        ]
        severity = {"disconnected": 0, "mismatch": 1, "ok": 2, "kink": 3, "zero": 4}
        worst = sorted(
            self.results,
            key=lambda r: (severity[r.status], -(r.rel_error if r.rel_error is not None else -1)),
        )[:8]
        if worst:
            width = max(len(r.param) + len(str(r.index or "")) for r in worst) + 2
            width = max(width, 9)
            lines.append(
                f"  {'parameter':<{width}} {'analytic':>11} {'numeric':>11} {'rel err':>9}  status"
            )
            for r in worst:
                name = r.param + ("" if r.index is None else str(list(r.index)))
                lines.append(
                    f"  {name:<{width}} {r.analytic:>11.4g} {r.numeric:>11.4g} "
                    f"{_fmt(r.rel_error):>9}  {r.status}"
                )
        for e in self.events:
            lines.append(f"  ! {e.kind} {e.param}: {e.message}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)
