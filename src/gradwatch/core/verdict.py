"""From measured entries to a verdict: statuses, events with their messages, the report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gradwatch.core import finite_diff as fd
from gradwatch.core.console import user_warn
from gradwatch.core.problem import Problem
from gradwatch.core.unchecked import event_report
from gradwatch.core.vocabulary import vocabulary
from gradwatch.report import CheckReport, EntryResult, GradientEvent, Status, Verdict

__all__ = [
    "LOCATE_ADVICE",
    "MIN_CONCLUSIVE_FRACTION",
    "Entry",
    "TensorInfo",
    "build_report",
    "judge_aggregate",
    "nonfinite_report",
]

#: The advice a mismatch message ends with until a localization names the module.
LOCATE_ADVICE = (
    "; check the backward of the operations between it and the loss "
    "(localize() or mode='modules' names the module whose backward is wrong)"
)

#: Below this share of conclusive ("ok") entries a check that found no failure is "inconclusive".
MIN_CONCLUSIVE_FRACTION = 0.25


@dataclass
class Entry:
    tensor: int
    index: tuple[int, ...] | None
    direction: npt.NDArray[np.float64] | None = None
    analytic: float = 0.0
    numeric: float = 0.0
    floor: float = 0.0
    zero_level: float = 0.0
    rel: float | None = None
    status: Status = "ok"
    candidate: bool = False
    replaced: bool = False
    rechecked: bool = False
    loss_plus: float = 0.0
    loss_minus: float = 0.0
    step_plus: float = 0.0
    step_minus: float = 0.0
    half_plus: float = 0.0
    half_minus: float = 0.0
    unresolved: bool = False


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    grad: npt.NDArray[np.floating] | None
    values: npt.NDArray[np.floating] | None = None
    rms: float = 0.0
    all_zero: bool = False
    taken: set[tuple[int, ...]] = field(default_factory=set)
    #: Entries whose gradient the framework defines as zero (an embedding's padding row):
    #: never sampled, and zero in every direction.
    excluded: npt.NDArray[np.bool_] | None = None


_LOW_PRECISION_WARNED = False


def _warn_low_precision_once(note: str) -> None:
    """One ``UserWarning`` per process the first time a check runs below float64."""
    global _LOW_PRECISION_WARNED
    if not _LOW_PRECISION_WARNED:
        _LOW_PRECISION_WARNED = True
        user_warn(f"gradwatch: {note}", UserWarning)


def nonfinite_report(
    *,
    step: int | None,
    mode: str,
    dtype: str,
    rtol: float,
    what: str,
    evaluations: int,
    seconds: float,
    notes: Sequence[str] = (),
) -> CheckReport:
    """An inconclusive report carrying one ``nonfinite`` event (the loss or a gradient is NaN/inf).

    Example:
        >>> r = nonfinite_report(step=None, mode="coordinate", dtype="float64", rtol=1e-3,
        ...                      what="the loss is nan", evaluations=1, seconds=0.0)
        >>> r.verdict, r.events[0].kind
        ('inconclusive', 'nonfinite')
    """
    event = GradientEvent(
        step=-1 if step is None else step,
        kind="nonfinite",
        param="global",
        value=float("nan"),
        threshold=float("inf"),
        message=f"{what}; no gradient check is possible until the values are finite.",
    )
    return event_report(
        event,
        step=step,
        mode=mode,
        dtype=dtype,
        rtol=rtol,
        evaluations=evaluations,
        seconds=seconds,
        notes=notes,
    )


def judge_aggregate(info: dict[int, TensorInfo], entries: list[Entry], tol: fd.Tolerances) -> None:
    """Low precision: a tensor fails only when its aggregate error exceeds ``rtol``."""
    for t, rec in info.items():
        mine = [e for e in entries if e.tensor == t and e.status == "ok"]
        if not mine:
            continue
        num = sum(abs(e.analytic - e.numeric) for e in mine)
        den = sum(max(abs(e.analytic), abs(e.numeric), e.floor) for e in mine)
        aggregate = num / den if den > 0 else 0.0
        if aggregate > tol.rtol:
            for e in mine:
                if e.rel is not None and e.rel > tol.rtol:
                    e.status = "disconnected" if rec.all_zero else "mismatch"


def build_report(
    problem: Problem,
    info: dict[int, TensorInfo],
    entries: list[Entry],
    tol: fd.Tolerances,
    dtype: np.dtype[np.floating],
    mode: str,
    step: int | None,
    evaluations: int,
    t0: float,
    notes: Sequence[str],
    framework: str = "torch",
) -> CheckReport:
    """The report of a measured check; messages speak ``framework``'s vocabulary."""
    words = vocabulary(framework)
    results = tuple(
        EntryResult(
            param=info[e.tensor].name,
            index=e.index,
            analytic=float(e.analytic),
            numeric=float(e.numeric),
            rel_error=None if e.status in ("kink", "zero") else e.rel,
            status=e.status,
        )
        for e in entries
    )
    events: list[GradientEvent] = []
    for t, rec in info.items():
        bad = [e for e in entries if e.tensor == t and e.status in ("mismatch", "disconnected")]
        if not bad:
            continue
        worst = max(bad, key=lambda e: e.rel if e.rel is not None else 0.0)
        where = "along a random direction" if worst.index is None else f"at {list(worst.index)}"
        if any(e.status == "disconnected" for e in bad):
            got = "no gradient" if rec.grad is None else "a gradient of exactly zero"
            events.append(
                GradientEvent(
                    step=-1 if step is None else step,
                    kind="disconnected",
                    param=rec.name,
                    value=float(worst.rel if worst.rel is not None else 1.0),
                    threshold=tol.rtol,
                    message=(
                        f"autodiff gives {rec.name} {got}, but the loss changes with it "
                        f"(finite difference {worst.numeric:.4g} {where}): {words.graph_cuts} "
                        f"cuts it out of the graph"
                    ),
                )
            )
        else:
            events.append(
                GradientEvent(
                    step=-1 if step is None else step,
                    kind="mismatch",
                    param=rec.name,
                    value=float(worst.rel if worst.rel is not None else float("nan")),
                    threshold=tol.rtol,
                    message=(
                        f"autodiff gives {worst.analytic:.6g} for {rec.name} {where} but finite "
                        f"differences give {worst.numeric:.6g} (relative error {worst.rel:.3g} > "
                        f"{tol.rtol:g}){LOCATE_ADVICE}"
                    ),
                )
            )
    conclusive = [e.rel for e in entries if e.status == "ok" and e.rel is not None]
    failing = [
        e.rel for e in entries if e.status in ("mismatch", "disconnected") and e.rel is not None
    ]
    judged = conclusive + failing
    max_rel = max(judged) if judged else None
    verdict: Verdict
    if events:
        verdict = "fail"
    elif not conclusive or len(conclusive) < MIN_CONCLUSIVE_FRACTION * len(entries):
        verdict = "inconclusive"
    else:
        verdict = "pass"
    extra = list(notes)
    if tol.aggregate:
        note = (
            f"checked in {dtype}: each tensor is judged by its aggregate error, and bugs smaller "
            f"than about {tol.rtol:.0%} of a gradient are invisible; use dtype='float64'"
        )
        extra.append(note)
        _warn_low_precision_once(note)
    return CheckReport(
        step=step,
        verdict=verdict,
        max_rel_error=max_rel,
        results=results,
        events=tuple(events),
        mode=mode,
        dtype=str(dtype),
        rtol=tol.rtol,
        evaluations=evaluations,
        seconds=time.perf_counter() - t0,
        notes=tuple(extra),
    )
