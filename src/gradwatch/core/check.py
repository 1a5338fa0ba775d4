"""The framework-free check engine: from a :class:`Problem` to a :class:`~gradwatch.CheckReport`.

An adapter (torch, Keras) exposes the model as a :class:`Problem`: named tensors, their values and
autodiff gradients as numpy arrays, and a function that evaluates the loss at a batch of perturbed
parameter values (each evaluation leaves the model as it found it). This module decides which
entries to look at, resamples kinks and builds the report; :mod:`gradwatch.core.measure` decides
how far to step and what the numbers mean.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from gradwatch.core import finite_diff as fd
from gradwatch.core.measure import _confirm, _measure
from gradwatch.core.problem import MODES, Perturbation, Problem, excluded_entries
from gradwatch.core.sampling import random_direction, sample_coordinates, sample_index
from gradwatch.core.verdict import (
    Entry,
    TensorInfo,
    build_report,
    judge_aggregate,
    nonfinite_report,
)
from gradwatch.report import CheckReport

__all__ = [
    "MODES",
    "Perturbation",
    "Problem",
    "check_problem",
    "nonfinite_report",
    "run_check",
]

#: Rounds of resampling after kinks (each kink gets at most this many replacements in its tensor).
MAX_RESAMPLE_ROUNDS = 3


def run_check(
    problem: Problem,
    *,
    tensors: Sequence[int] | None = None,
    num_params: int = 32,
    mode: Literal["coordinate", "directional"] | str = "coordinate",
    rng: np.random.Generator,
    rtol: float | None = None,
    eps: float | None = None,
    step: int | None = None,
    notes: Sequence[str] = (),
    started: float | None = None,
    framework: str = "torch",
    recheck_above: float | None = None,
) -> CheckReport:
    """Check the autodiff gradients of ``problem`` against central finite differences.

    Args:
        problem: The adapter's view of the model.
        tensors: Indices of the tensors to check (default: all). Each gets at least one entry.
        num_params: Coordinates in all (``coordinate`` mode), spread by tensor size.
        mode: ``"coordinate"`` or ``"directional"`` (one random unit direction per tensor).
        rng: Private generator for sampling (the user's RNG streams are never touched).
        rtol: Tolerance; ``None`` for the dtype's default (:func:`~gradwatch.core.finite_diff.tolerances_for`).
        eps: Base step replacing ``cbrt(eps_machine)``.
        step: Optimizer step recorded in the report and its events.
        notes: Remarks carried into the report.
        started: ``time.perf_counter()`` when the check began (for ``seconds``), default now.
        framework: Whose words the messages use (``"torch"``, ``"keras"``; see
            :mod:`~gradwatch.core.vocabulary`).
        recheck_above: Directional mode: a direction that passed with a relative error above
            this fraction of ``rtol`` gets a second, fresh direction of the same tensor (one
            direction can lie nearly orthogonal to a gradient's error and land just under
            ``rtol``; correct gradients agree to about 1e-8). ``None``: no second look.

    Returns:
        The report. Entries whose estimates at ``h`` and ``h/2`` disagree are kinks and are replaced
        by fresh samples of the same tensor, at most :data:`MAX_RESAMPLE_ROUNDS` times.
    """
    t0 = time.perf_counter() if started is None else started
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dtype = np.dtype(problem.dtype)
    tol = fd.tolerances_for(dtype, rtol)
    chosen = list(range(len(problem.names))) if tensors is None else list(tensors)
    evaluations = 1
    base = float(problem.base_loss)

    def nonfinite(what: str) -> CheckReport:
        return nonfinite_report(
            step=step,
            mode=mode,
            dtype=str(dtype),
            rtol=tol.rtol,
            what=what,
            evaluations=evaluations,
            seconds=time.perf_counter() - t0,
            notes=notes,
        )

    if not np.isfinite(base):
        return nonfinite(f"the loss is {base}")
    info: dict[int, TensorInfo] = {}
    for t in chosen:
        g = problem.gradient(t)
        if g is not None and not np.all(np.isfinite(g)):
            return nonfinite(f"the gradient of {problem.names[t]} is not finite")
        rec = TensorInfo(name=problem.names[t], shape=tuple(problem.shapes[t]), grad=g)
        if g is not None and g.size:
            rec.rms = float(np.sqrt(np.mean(np.square(g, dtype=np.float64))))
        rec.all_zero = g is None or not np.any(g)
        rec.excluded = excluded_entries(problem, t)
        if rec.excluded is not None:
            rec.taken.update(tuple(int(i) for i in ix) for ix in np.argwhere(rec.excluded))
            if rec.excluded.all():
                continue  # nothing of it may be checked
        info[t] = rec
    chosen = [t for t in chosen if t in info]

    entries: list[Entry] = []
    if mode == "coordinate":
        picks = sample_coordinates([info[t].shape for t in chosen], num_params, rng)
        for t, idxs in zip(chosen, picks, strict=True):
            for pick in idxs:
                idx = (
                    pick
                    if pick not in info[t].taken
                    else sample_index(info[t].shape, rng, info[t].taken)
                )
                if idx is None:
                    continue
                info[t].taken.add(idx)
                entries.append(Entry(tensor=t, index=idx))
            if info[t].all_zero and len(idxs) < _size(info[t].shape):
                # Autodiff says the loss ignores this tensor: one direction through all its
                # entries as well, since a few coordinates can all land where the loss really
                # ignores it (unused embedding rows) and miss that the rest is disconnected.
                entries.append(Entry(tensor=t, index=None, direction=_direction(info[t], rng)))
    else:
        for t in chosen:
            entries.append(Entry(tensor=t, index=None, direction=_direction(info[t], rng)))

    done: list[Entry] = []
    pending = entries
    noise = 0.0
    for round_no in range(MAX_RESAMPLE_ROUNDS + 1):
        if not pending:
            break
        evaluations += _measure(problem, info, pending, base, dtype, tol, eps)
        suspects = [e for e in pending if e.candidate]
        if suspects:
            resolved = _smallest_resolved_change([*done, *pending])
            used, measured = _confirm(problem, info, suspects, base, dtype, tol, eps, resolved)
            evaluations += used
            noise = max(noise, measured)
        done.extend(pending)
        if round_no == MAX_RESAMPLE_ROUNDS:
            break
        pending = []
        for e in done:
            if e.status == "kink" and not e.replaced:
                e.replaced = True
                rec = info[e.tensor]
                if mode == "coordinate":
                    fresh = sample_index(rec.shape, rng, rec.taken)
                    if fresh is not None:
                        rec.taken.add(fresh)
                        pending.append(Entry(tensor=e.tensor, index=fresh))
                else:
                    pending.append(
                        Entry(tensor=e.tensor, index=None, direction=_direction(rec, rng))
                    )
        if mode == "directional" and recheck_above is not None:
            pending += _second_looks(done, info, recheck_above * tol.rtol, rng)

    if tol.aggregate:
        judge_aggregate(info, done, tol)
    notes = [*notes, *_precision_notes(done, base, noise)]
    return build_report(
        problem, info, done, tol, dtype, mode, step, evaluations, t0, notes, framework
    )


def _second_looks(
    done: Sequence[Entry], info: dict[int, TensorInfo], above: float, rng: np.random.Generator
) -> list[Entry]:
    """A fresh direction for each tensor whose direction passed with a relative error above
    ``above`` (once per tensor)."""
    fresh: list[Entry] = []
    looked = {e.tensor for e in done if e.rechecked}
    for e in done:
        if e.status != "ok" or e.rel is None or e.rel <= above or e.tensor in looked:
            continue
        looked.add(e.tensor)
        e.rechecked = True
        fresh.append(Entry(tensor=e.tensor, index=None, direction=_direction(info[e.tensor], rng)))
    return fresh


def _direction(rec: TensorInfo, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A random unit direction through the tensor, zero on its excluded entries."""
    u = random_direction(rec.shape, rng)
    if rec.excluded is None:
        return u
    u = np.where(rec.excluded, 0.0, u)
    return np.asarray(u / float(np.linalg.norm(u)), dtype=np.float64)


def _size(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _smallest_resolved_change(entries: Sequence[Entry]) -> float:
    """The smallest ``|L(θ+h) − L(θ−h)|`` of an entry that agreed with autodiff to ``rtol``."""
    changes = [
        abs(e.loss_plus - e.loss_minus)
        for e in entries
        if e.status == "ok" and not e.candidate and e.loss_plus != e.loss_minus
    ]
    return min(changes, default=float("inf"))


def _precision_notes(entries: Sequence[Entry], base: float, noise: float) -> list[str]:
    """Why entries were left unjudged for want of precision (empty when none was)."""
    unresolved = sum(e.unresolved for e in entries)
    if not unresolved:
        return []
    measured = f"rounding noise {noise:.2g} on a loss of {abs(base):.2g}" if noise else ""
    return [
        f"{unresolved} entries are 'zero': below what the loss evaluations resolve"
        + (f" ({measured})" if measured else "")
        + "; the loss is rounded more coarsely than float64 at its value (computed in float32, "
        "or as a difference of much larger intermediate values) — compute it in float64 from "
        "well-scaled values to check them"
    ]


def check_problem(
    problem: Problem,
    *,
    tensors: Sequence[int],
    num_params: int,
    mode: str,
    rng: np.random.Generator,
    rtol: float | None,
    eps: float | None,
    step: int | None,
    notes: Sequence[str],
    started: float,
    hint: str = "",
    framework: str = "torch",
) -> CheckReport:
    """:func:`run_check` as the adapters use it: notes on coverage, and a clear error for a loss
    that depends on none of the model's tensors.

    Raises:
        ValueError: No tensor of ``problem`` has an autodiff gradient and finite differences found
            no dependence either (a ``disconnected`` failure is reported, not raised).
    """
    notes = list(notes)
    if mode == "coordinate" and len(tensors) > num_params:
        notes.append(
            f"{len(tensors)} tensors but num_params={num_params}: one coordinate per tensor"
        )
    report = run_check(
        problem,
        tensors=tensors,
        num_params=num_params,
        mode=mode,
        rng=rng,
        rtol=rtol,
        eps=eps,
        step=step,
        notes=notes,
        started=started,
        framework=framework,
    )
    no_path = all(problem.gradient(t) is None for t in range(len(problem.names)))
    if no_path and not report.failed and not report.events:
        raise ValueError(
            "the loss has no autograd path to any checked parameter, and finite differences "
            "show that it does not depend on them either" + (f": {hint}" if hint else "")
        )
    return report
