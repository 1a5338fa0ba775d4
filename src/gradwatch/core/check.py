"""The framework-free check engine: from a :class:`Problem` to a :class:`~gradwatch.CheckReport`.

An adapter (torch, Keras) exposes the model as a :class:`Problem`: named tensors, their values and
autodiff gradients as numpy arrays, and a function that evaluates the loss at a batch of perturbed
parameter values (each evaluation leaves the model as it found it). This module decides which
entries to look at, how far to step, and what the numbers mean.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import numpy as np

from gradwatch.core import finite_diff as fd
from gradwatch.core.problem import MODES, Perturbation, Problem
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
        info[t] = rec

    entries: list[Entry] = []
    if mode == "coordinate":
        picks = sample_coordinates([info[t].shape for t in chosen], num_params, rng)
        for t, idxs in zip(chosen, picks, strict=True):
            for idx in idxs:
                info[t].taken.add(idx)
                entries.append(Entry(tensor=t, index=idx))
    else:
        for t in chosen:
            entries.append(
                Entry(tensor=t, index=None, direction=random_direction(info[t].shape, rng))
            )

    done: list[Entry] = []
    pending = entries
    for round_no in range(MAX_RESAMPLE_ROUNDS + 1):
        if not pending:
            break
        evaluations += _measure(problem, info, pending, base, dtype, tol, eps)
        suspects = [e for e in pending if e.candidate]
        if suspects:
            evaluations += _confirm(problem, info, suspects, base, dtype, tol, eps)
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
                        Entry(
                            tensor=e.tensor,
                            index=None,
                            direction=random_direction(rec.shape, rng),
                        )
                    )

    if tol.aggregate:
        judge_aggregate(info, done, tol)
    return build_report(problem, info, done, tol, dtype, mode, step, evaluations, t0, notes)


def _plan(
    problem: Problem,
    info: dict[int, TensorInfo],
    e: Entry,
    dtype: np.dtype[np.floating],
    eps: float | None,
    scale: float,
) -> tuple[Perturbation, Perturbation, float, float]:
    """Perturbations ``±h·scale`` for an entry, the step really taken, and the analytic value.

    Also records on the entry the one-sided steps ``fl(θ+h) − θ`` and ``θ − fl(θ−h)``.
    """
    rec = info[e.tensor]
    if rec.values is None:
        rec.values = np.asarray(problem.values(e.tensor))
    if e.index is not None:
        theta = float(rec.values[e.index])
        h = fd.step_size(theta, dtype, eps) * scale
        plus, minus = fd.perturbed_values(theta, h, dtype)
        taken = float(plus.astype(np.float64) - minus.astype(np.float64))
        if scale == 1.0:
            e.step_plus = float(plus.astype(np.float64)) - theta
            e.step_minus = theta - float(minus.astype(np.float64))
        analytic = 0.0 if rec.grad is None else float(rec.grad[e.index])
        return (
            Perturbation(e.tensor, e.index, plus),
            Perturbation(e.tensor, e.index, minus),
            taken,
            analytic,
        )
    assert e.direction is not None
    theta_arr = rec.values
    biggest = float(np.max(np.abs(theta_arr))) if theta_arr.size else 0.0
    h = fd.step_size(biggest, dtype, eps) * scale
    plus, minus = fd.perturbed_values(theta_arr, h * e.direction, dtype)
    moved = plus.astype(np.float64) - minus.astype(np.float64)
    taken = float(np.linalg.norm(moved))
    if scale == 1.0:
        base64 = theta_arr.astype(np.float64)
        e.step_plus = float(np.linalg.norm(plus.astype(np.float64) - base64))
        e.step_minus = float(np.linalg.norm(base64 - minus.astype(np.float64)))
    analytic = 0.0
    if rec.grad is not None and taken > 0:
        analytic = float(np.dot(rec.grad.astype(np.float64).ravel(), moved.ravel()) / taken)
    return Perturbation(e.tensor, None, plus), Perturbation(e.tensor, None, minus), taken, analytic


def _measure(
    problem: Problem,
    info: dict[int, TensorInfo],
    entries: list[Entry],
    base: float,
    dtype: np.dtype[np.floating],
    tol: fd.Tolerances,
    eps: float | None,
) -> int:
    perts: list[Perturbation] = []
    meta: list[tuple[float, float]] = []
    for e in entries:
        p, m, taken, analytic = _plan(problem, info, e, dtype, eps, 1.0)
        perts += [p, m]
        meta.append((taken, analytic))
    losses = np.asarray(problem.losses(perts), dtype=np.float64)
    for k, e in enumerate(entries):
        taken, analytic = meta[k]
        lp, lm = float(losses[2 * k]), float(losses[2 * k + 1])
        rec = info[e.tensor]
        e.analytic = analytic
        e.loss_plus, e.loss_minus = lp, lm
        if not (np.isfinite(lp) and np.isfinite(lm)) or taken == 0.0:
            # Undefined difference quotient (loss not finite nearby, or a step lost to rounding).
            e.numeric, e.status, e.rel = float("nan"), "kink", None
            continue
        e.numeric = fd.central_difference(lp, lm, taken)
        res = fd.resolution_floor([lp, lm, base], taken, dtype)
        e.zero_level = fd.ZERO_FACTOR * res
        # Floor: a fraction of the tensor's gradient scale, and never below what rounding noise
        # alone can produce relative to rtol (an absolute tolerance of ZERO_FACTOR resolutions).
        e.floor = max(fd.FLOOR_FRACTION * rec.rms, e.zero_level / tol.rtol)
        if abs(e.analytic) <= e.zero_level and abs(e.numeric) <= e.zero_level:
            e.status, e.rel = "zero", None
            continue
        if rec.grad is None:
            e.status, e.rel = "disconnected", 1.0
            continue
        e.rel = fd.relative_error(e.analytic, e.numeric, e.floor)
        e.status = "ok"
        e.candidate = e.rel > tol.rtol
    return len(perts)


def _confirm(
    problem: Problem,
    info: dict[int, TensorInfo],
    entries: list[Entry],
    base: float,
    dtype: np.dtype[np.floating],
    tol: fd.Tolerances,
    eps: float | None,
) -> int:
    """Decide whether each suspect is a kink or a real mismatch.

    Two tests, either of which marks a kink:

    * **one-sided slopes**: ``(L(θ+h) − L(θ)) / h₊`` against ``(L(θ) − L(θ−h)) / h₋``. A single kink
      inside the step shifts the central estimate by half the gap between them, so a kink that
      can explain a relative error above ``rtol`` opens a gap above ``2·rtol`` — whether it sits
      near the edge of the step or right at θ (where the ``h/2`` test is blind: both central
      estimates then average the same two slopes). At a smooth point the gap is ``h·|L''|``.
    * **h vs h/2**: the central estimates at ``h`` and ``h/2`` disagree by more than ``kink_tol``.

    Costs one unperturbed evaluation per round plus two per suspect; passing entries never pay.
    """
    perts: list[Perturbation] = []
    takens: list[float] = []
    for e in entries:
        p, m, taken, _ = _plan(problem, info, e, dtype, eps, 0.5)
        perts += [p, m]
        takens.append(taken)
    # L(θ) evaluated the way the perturbed losses were (the base loss came with a backward pass).
    first = entries[0]
    rec0 = info[first.tensor]
    assert rec0.values is not None
    current = rec0.values if first.index is None else np.asarray(rec0.values[first.index])
    perts.append(Perturbation(first.tensor, first.index, np.asarray(current, dtype=dtype)))
    losses = np.asarray(problem.losses(perts), dtype=np.float64)
    centre = float(losses[-1])
    for k, e in enumerate(entries):
        lp, lm = float(losses[2 * k]), float(losses[2 * k + 1])
        if takens[k] == 0.0 or not (np.isfinite(lp) and np.isfinite(lm) and np.isfinite(centre)):
            e.status, e.rel = "kink", None
            continue
        half = fd.central_difference(lp, lm, takens[k])
        one_sided_gap = 0.0
        if e.step_plus > 0 and e.step_minus > 0:
            forward = (e.loss_plus - centre) / e.step_plus
            backward = (centre - e.loss_minus) / e.step_minus
            one_sided_gap = fd.relative_error(forward, backward, e.floor)
        if one_sided_gap > 2 * tol.rtol or fd.is_kink(e.numeric, half, e.floor, tol.kink_tol):
            e.status, e.rel = "kink", None
        elif not tol.aggregate:  # low precision: the tensor's aggregate decides (_judge_aggregate)
            e.status = "disconnected" if info[e.tensor].all_zero else "mismatch"
    return len(perts)


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
    )
    no_path = all(problem.gradient(t) is None for t in range(len(problem.names)))
    if no_path and not report.failed and not report.events:
        raise ValueError(
            "the loss has no autograd path to any checked parameter, and finite differences "
            "show that it does not depend on them either" + (f": {hint}" if hint else "")
        )
    return report
