"""Finite-difference numerics: step choice, central differences, relative error, resolution, kinks.

Everything here is a small pure function on numpy values; the measurements behind each choice
are in ``docs/how-it-works.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "Tolerances",
    "central_difference",
    "is_kink",
    "machine_eps",
    "perturbed_values",
    "relative_error",
    "resolution_floor",
    "step_size",
    "tolerances_for",
]

#: Relative-error floor, as a fraction of the RMS of the tensor's gradient (DESIGN §3).
FLOOR_FRACTION = 1e-3
#: Entries whose analytic and numeric values are both below this many resolution floors are "zero".
ZERO_FACTOR = 10.0


def machine_eps(dtype: npt.DTypeLike) -> float:
    """Machine epsilon of a floating dtype.

    Example:
        >>> machine_eps("float64")
        2.220446049250313e-16
    """
    return float(np.finfo(np.dtype(dtype)).eps)


def step_size(theta: float, dtype: npt.DTypeLike, eps: float | None = None) -> float:
    """Step ``h = base * max(1, |theta|)`` with ``base = cbrt(eps_machine)`` unless ``eps`` is given.

    The cube root balances truncation error (``O(h^2)``) against rounding (``eps/h``) for central
    differences.

    Example:
        >>> round(step_size(0.1, "float64"), 9)
        6.055e-06
        >>> step_size(10.0, "float64", eps=1e-4)
        0.001
    """
    base = float(np.cbrt(machine_eps(dtype))) if eps is None else float(eps)
    return base * max(1.0, abs(float(theta)))


def perturbed_values(
    theta: npt.ArrayLike, delta: npt.ArrayLike, dtype: npt.DTypeLike
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.floating]]:
    """``fl(theta + delta)`` and ``fl(theta - delta)`` rounded to ``dtype``, as the model will hold them.

    Example:
        >>> plus, minus = perturbed_values(1.0, 1e-9, "float32")
        >>> float(plus - minus)   # the step really taken in float32 is zero, not 2e-9
        0.0
    """
    t = np.asarray(theta, dtype=np.float64)
    d = np.asarray(delta, dtype=np.float64)
    return (t + d).astype(dtype), (t - d).astype(dtype)


def central_difference(loss_plus: float, loss_minus: float, taken: float) -> float:
    """Central difference quotient divided by the step actually taken, ``fl(θ+h) − fl(θ−h)``.

    Example:
        >>> central_difference(1.5, 0.5, 2.0)
        0.5
    """
    if taken == 0.0:
        return float("nan")
    return (float(loss_plus) - float(loss_minus)) / float(taken)


def relative_error(analytic: float, numeric: float, floor: float = 0.0) -> float:
    """``|a − n| / max(|a|, |n|, floor)``; 0 when all three are 0.

    Example:
        >>> relative_error(1.0, 0.9)
        0.09999999999999998
        >>> relative_error(1e-12, -1e-12, floor=1e-6)
        2e-06
    """
    a, n = float(analytic), float(numeric)
    denom = max(abs(a), abs(n), float(floor))
    if denom == 0.0:
        return 0.0
    if not np.isfinite(denom):
        return float("inf") if not (np.isfinite(a) and np.isfinite(n)) else 0.0
    return abs(a - n) / denom


def resolution_floor(losses: npt.ArrayLike, taken: float, dtype: npt.DTypeLike) -> float:
    """Smallest slope a difference quotient can resolve: one rounding step of the loss over the step.

    Example:
        >>> resolution_floor([2.0, 2.0], 1e-5, "float64") > 0
        True
    """
    scale = float(np.max(np.abs(np.asarray(losses, dtype=np.float64))))
    if taken == 0.0:
        return float("inf")
    return machine_eps(dtype) * max(scale, np.finfo(np.float64).tiny) / abs(float(taken))


def is_kink(numeric_h: float, numeric_half: float, floor: float, tol: float) -> bool:
    """Whether estimates at ``h`` and ``h/2`` disagree by more than ``tol`` (a non-smooth point).

    Example:
        >>> is_kink(1.0, 1.0 + 1e-9, 0.0, 5e-4), is_kink(1.0, 0.5, 0.0, 5e-4)
        (False, True)
    """
    return relative_error(numeric_h, numeric_half, floor) > tol


@dataclass(frozen=True)
class Tolerances:
    """Thresholds for one check dtype.

    Attributes:
        rtol: Relative error above which an entry (float64) or a tensor's aggregate (float32) fails.
        kink_tol: Disagreement between the ``h`` and ``h/2`` estimates that marks a kink.
        aggregate: Judge each tensor by its aggregate error (float32: single entries are noise).
    """

    rtol: float
    kink_tol: float
    aggregate: bool


def tolerances_for(dtype: npt.DTypeLike, rtol: float | None = None) -> Tolerances:
    """Documented default tolerances of a check dtype; ``rtol`` overrides the default.

    float64: ``rtol=1e-3`` per entry (correct models measured at most ~3e-6 away from kinks),
    kinks above ``5e-4``. float32 and lower: per-entry errors of correct models reach 0.15–0.58, so
    each tensor is judged by its aggregate error ``Σ|a−n| / Σ max(|a|,|n|)`` against ``rtol=0.4``:
    only gross bugs (sign flips, missing terms, a factor of two) are visible.

    Example:
        >>> tolerances_for("float64").rtol, tolerances_for("float32").aggregate
        (0.001, True)
    """
    dt = np.dtype(dtype)
    if dt == np.float64:
        return Tolerances(
            rtol=1e-3 if rtol is None else float(rtol), kink_tol=5e-4, aggregate=False
        )
    return Tolerances(rtol=0.4 if rtol is None else float(rtol), kink_tol=0.1, aggregate=True)
