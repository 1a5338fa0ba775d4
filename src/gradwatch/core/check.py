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
import numpy.typing as npt

from gradwatch.core import finite_diff as fd
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
