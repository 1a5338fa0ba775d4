"""Measuring sampled entries: central differences at ``h``, then five losses for each suspect.

:func:`~gradwatch.core.check.run_check` decides which entries to look at; this module plans each
entry's perturbations, evaluates them through the :class:`~gradwatch.core.problem.Problem`, and
sets each entry's status (``ok``, ``zero``, ``kink``, ``disconnected``, ``mismatch``) from the
losses: the resolution floor, Richardson extrapolation, kinks by scaling and the loss's own
rounding noise.
"""

from __future__ import annotations

import numpy as np

from gradwatch.core import finite_diff as fd
from gradwatch.core.problem import Perturbation, Problem
from gradwatch.core.verdict import Entry, TensorInfo


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
        _record_steps(
            e,
            scale,
            float(plus.astype(np.float64)) - theta,
            theta - float(minus.astype(np.float64)),
        )
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
    base64 = theta_arr.astype(np.float64)
    _record_steps(
        e,
        scale,
        float(np.linalg.norm(plus.astype(np.float64) - base64)),
        float(np.linalg.norm(base64 - minus.astype(np.float64))),
    )
    analytic = 0.0
    if rec.grad is not None and taken > 0:
        analytic = float(np.dot(rec.grad.astype(np.float64).ravel(), moved.ravel()) / taken)
    return Perturbation(e.tensor, None, plus), Perturbation(e.tensor, None, minus), taken, analytic


def _record_steps(e: Entry, scale: float, up: float, down: float) -> None:
    """Keep the one-sided steps really taken at ``h`` (``scale`` 1) and ``h/2`` (``scale`` 0.5)."""
    if scale == 1.0:
        e.step_plus, e.step_minus = up, down
    elif scale == 0.5:
        e.half_plus, e.half_minus = up, down


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
    precision = _loss_precision(np.append(losses, base), dtype, tol)
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
        res = fd.resolution_floor([lp, lm, base], taken, precision)
        if _set_levels(e, rec.rms, res, tol, degraded=precision != dtype):
            continue
        if rec.grad is None:
            e.status, e.rel = "disconnected", 1.0
            continue
        e.rel = fd.relative_error(e.analytic, e.numeric, e.floor)
        e.status = "ok"
        e.candidate = e.rel > tol.rtol
    return len(perts)


def _loss_precision(
    losses: np.ndarray, dtype: np.dtype[np.floating], tol: fd.Tolerances
) -> np.dtype[np.floating]:
    """The precision the loss values really have (float64 checks only; float32 is judged in
    aggregate already)."""
    return dtype if tol.aggregate else fd.effective_dtype(losses, dtype)


def _set_levels(e: Entry, rms: float, res: float, tol: fd.Tolerances, degraded: bool) -> bool:
    """Set an entry's zero level and floor from the resolution ``res``; ``True`` when it is ``zero``.

    Floor: a fraction of the tensor's gradient scale, and never below what rounding noise alone
    can produce relative to rtol (an absolute tolerance of ZERO_FACTOR resolutions). Where the
    evaluations had less than the check's precision (``degraded``), an entry is judged only when
    it stands above that absolute tolerance: a pass inside it would be a pass by tolerance alone.
    """
    e.zero_level = fd.ZERO_FACTOR * res
    e.floor = max(fd.FLOOR_FRACTION * rms, e.zero_level / tol.rtol)
    level = e.zero_level / tol.rtol if degraded else e.zero_level
    if abs(e.analytic) <= level and abs(e.numeric) <= level:
        e.status, e.rel, e.candidate, e.unresolved = "zero", None, False, degraded
        return True
    return False


def _confirm(
    problem: Problem,
    info: dict[int, TensorInfo],
    entries: list[Entry],
    base: float,
    dtype: np.dtype[np.floating],
    tol: fd.Tolerances,
    eps: float | None,
    resolved: float = float("inf"),
) -> tuple[int, float]:
    """Decide whether each suspect is ``ok``, ``zero``, a kink or a real mismatch.

    Each suspect is evaluated at ``θ ± h/2`` as well (plus one ``L(θ)`` per round, shared by all
    suspects): five losses. From them, for float64 checks (:func:`_judge_five`):

    * **the precision the evaluations really had**: the fourth difference of five losses is zero
      for any cubic, so at smooth points it is rounding noise; its median over the suspects is the
      noise level of the loss, which sets the resolution when it exceeds ``eps · |L|`` (a loss
      rounded absolutely, or computed below float64);
    * **Richardson**: ``(4·D(h/2) − D(h)) / 3`` removes the ``O(h²)`` truncation, which near an
      optimum can exceed the gradient itself;
    * **kinks by scaling**: the one-sided gap halves with ``h`` at a smooth point and stays at a
      kink (:func:`~gradwatch.core.finite_diff.kink_evidence`); only such evidence, as large as a
      fraction of the deviation it is to explain, makes a kink. A smooth point near an optimum
      (tiny gradient, ordinary curvature) is never one.

    Float32 checks keep the size tests (one-sided gap above ``2·rtol``, ``h`` against ``h/2`` above
    ``kink_tol``): there each tensor's aggregate decides.

    Args:
        resolved: The smallest loss change ``|L(θ+h) − L(θ−h)|`` that an entry of this check
            resolved to ``rtol``: a flat loss where autodiff predicts a larger change is a bug.

    Returns:
        The evaluations used and the noise level measured (0 when not measured).
    """
    perts: list[Perturbation] = []
    takens: list[float] = []
    for e in entries:
        p, m, taken, _ = _plan(problem, info, e, dtype, eps, 0.5)
        perts += [p, m]
        takens.append(taken)
    probed = [] if tol.aggregate else entries[: fd.MAX_NOISE_PROBES]
    tiny: list[tuple[float, float]] = []
    for e in probed:
        p, m, _, _ = _plan(problem, info, e, dtype, eps, 1.0 / fd.NOISE_STEP_DIVISOR)
        perts += [p, m]
        tiny.append((_distance(info[e.tensor], p), _distance(info[e.tensor], m)))
    # L(θ) evaluated the way the perturbed losses were (the base loss came with a backward pass).
    first = entries[0]
    rec0 = info[first.tensor]
    assert rec0.values is not None
    current = rec0.values if first.index is None else np.asarray(rec0.values[first.index])
    perts.append(Perturbation(first.tensor, first.index, np.asarray(current, dtype=dtype)))
    losses = np.asarray(problem.losses(perts), dtype=np.float64)
    centre = float(losses[-1])
    usable: list[tuple[Entry, fd.FivePoints]] = []
    for k, e in enumerate(entries):
        lp, lm = float(losses[2 * k]), float(losses[2 * k + 1])
        steps = (e.step_plus, e.step_minus, e.half_plus, e.half_minus)
        if takens[k] == 0.0 or min(steps) <= 0 or not np.all(np.isfinite([lp, lm, centre])):
            e.status, e.rel = "kink", None
            continue
        points = fd.FivePoints(
            minus=e.loss_minus,
            minus_half=lm,
            centre=centre,
            plus_half=lp,
            plus=e.loss_plus,
            step_minus=e.step_minus,
            step_minus_half=e.half_minus,
            step_plus_half=e.half_plus,
            step_plus=e.step_plus,
        )
        if tol.aggregate:
            _judge_by_size(e, points, tol)
        else:
            usable.append((e, points))
    pooled = fd.noise_from_fourth_differences([fd.fourth_difference(p) for _, p in usable])
    noise = max(pooled, _probe_noise(entries, losses[2 * len(entries) : -1], tiny, centre))
    precision = _loss_precision(np.append(losses, [base, *_outer(usable)]), dtype, tol)
    for e, points in usable:
        _judge_five(e, points, info[e.tensor], tol, precision, dtype, noise, resolved)
    return len(perts), noise


def _distance(rec: TensorInfo, pert: Perturbation) -> float:
    """How far a perturbation really moves its tensor (the one-sided step taken)."""
    assert rec.values is not None
    now = rec.values if pert.index is None else np.asarray(rec.values[pert.index])
    moved = np.asarray(pert.value, dtype=np.float64) - np.asarray(now, dtype=np.float64)
    return float(np.linalg.norm(moved))


def _probe_noise(
    entries: list[Entry], losses: np.ndarray, tiny: list[tuple[float, float]], centre: float
) -> float:
    """The loss's rounding noise: the median over the probed suspects of
    :func:`~gradwatch.core.finite_diff.noise_sample` at ``θ ± h/1024`` (0 when none was usable)."""
    samples = []
    for k, (up, down) in enumerate(tiny):
        e = entries[k]
        lp, lm = float(losses[2 * k]), float(losses[2 * k + 1])
        outer = e.step_plus + e.step_minus
        if min(up, down, e.step_plus, e.step_minus) <= 0 or not np.isfinite([lp, lm]).all():
            continue
        gap = (e.loss_plus - centre) / e.step_plus - (centre - e.loss_minus) / e.step_minus
        samples.append(fd.noise_sample(lm, centre, lp, down, up, 2.0 * gap / outer))
    finite = [s for s in samples if np.isfinite(s)]
    return float(np.median(finite)) / 0.6745 if finite else 0.0


def _outer(usable: list[tuple[Entry, fd.FivePoints]]) -> list[float]:
    """The losses at ``θ ± h`` of the suspects (for the loss's effective precision)."""
    return [v for _, p in usable for v in (p.plus, p.minus)]


def _judge_by_size(e: Entry, p: fd.FivePoints, tol: fd.Tolerances) -> None:
    """Low-precision checks: a suspect is a kink when its one-sided slopes or its estimates at
    ``h`` and ``h/2`` differ by more than a fixed share (the tensor's aggregate judges the rest)."""
    forward = (p.plus - p.centre) / p.step_plus
    backward = (p.centre - p.minus) / p.step_minus
    one_sided_gap = fd.relative_error(forward, backward, e.floor)
    if one_sided_gap > 2 * tol.rtol or fd.is_kink(
        e.numeric, p.central(half=True), e.floor, tol.kink_tol
    ):
        e.status, e.rel = "kink", None


def _judge_five(
    e: Entry,
    p: fd.FivePoints,
    rec: TensorInfo,
    tol: fd.Tolerances,
    precision: np.dtype[np.floating],
    dtype: np.dtype[np.floating],
    noise: float,
    resolved: float,
) -> None:
    """A float64 suspect's status from its five losses (see :func:`_confirm`)."""
    taken = p.step_plus + p.step_minus
    n_h = p.central(half=False)
    extrapolated = fd.richardson(n_h, p.central(half=True))
    best = min((n_h, extrapolated), key=lambda n: abs(e.analytic - n))
    deviation = abs(e.analytic - best)
    if fd.relative_error(e.analytic, best, e.floor) > tol.rtol and fd.is_kink_by_scaling(
        deviation, p
    ):
        # Before the noise: a pooled noise level may include a few kinks, which must stay kinks.
        e.status, e.rel = "kink", None
        return
    if p.flat():
        # The loss did not move at all. A bug (autodiff's gradient for something the loss does not
        # use) only if the check resolved smaller changes elsewhere; otherwise below resolution.
        if abs(e.analytic) * taken < resolved:
            e.status, e.rel, e.unresolved = "zero", None, True
            return
    else:
        # The noise this entry's own five losses show (their fourth difference), and the pooled
        # level: a deviation inside either is rounding, not a bug.
        own = abs(fd.fourth_difference(p)) * fd.OWN_NOISE_FACTOR
        res = fd.resolution_floor([p.plus, p.minus, p.centre], taken, precision, max(noise, own))
        prior = fd.resolution_floor([p.plus, p.minus, p.centre], taken, dtype)
        degraded = precision != dtype or res > 10.0 * prior
        if _set_levels(e, rec.rms, res, tol, degraded):
            return
    rel = fd.relative_error(e.analytic, best, e.floor)
    if rel <= tol.rtol:
        e.numeric, e.rel, e.status = best, rel, "ok"
    else:
        e.status = "disconnected" if rec.all_zero else "mismatch"
