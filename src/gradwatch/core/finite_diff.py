"""Finite-difference numerics: step choice, central differences, relative error, resolution, kinks.

Everything here is a small pure function on numpy values; the measurements behind each choice
are in ``docs/how-it-works.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "FivePoints",
    "Tolerances",
    "central_difference",
    "effective_dtype",
    "fourth_difference",
    "is_kink",
    "is_kink_by_scaling",
    "kink_evidence",
    "machine_eps",
    "noise_from_fourth_differences",
    "noise_sample",
    "perturbed_values",
    "relative_error",
    "resolution_floor",
    "richardson",
    "step_size",
    "tolerances_for",
]

#: Relative-error floor, as a fraction of the RMS of the tensor's gradient (DESIGN §3).
FLOOR_FRACTION = 1e-3
#: Entries whose analytic and numeric values are both below this many resolution floors are "zero".
ZERO_FACTOR = 10.0
#: Kink evidence must reach this fraction of the deviation it is to explain: a single kink anywhere
#: in ``[θ−h, θ+h]`` gives evidence of at least 0.83 of the deviation it causes (worst position);
#: a smooth point gives rounding noise only.
KINK_FRACTION = 0.25
#: The ``h``/``h/2`` drift a smooth point may show, as a fraction of its one-sided gap (smooth:
#: ``|L'''|·h / (8·|L''|)``, about 1e-6 of it for ``h`` near 6e-6).
SMOOTH_ALLOWANCE = 0.01
#: Fewest suspects from which a noise level is pooled (the median of fewer may be one kink).
MIN_NOISE_SAMPLES = 3
#: An entry's own fourth difference, times this, bounds its noise: one sample of ``sqrt(70)·σ``
#: is below ``σ/5`` with probability 2%; a noise-made deviation then stays under ten resolutions
#: (``ZERO_FACTOR``) unless it is a 3.5σ event as well.
OWN_NOISE_FACTOR = 0.6
#: Noise probes step ``h`` divided by this: a kink inside so small a step is improbable.
NOISE_STEP_DIVISOR = 1024.0
#: At most this many suspects per round are probed for the noise level (two evaluations each).
MAX_NOISE_PROBES = 8
#: A fourth difference of independent noise of standard deviation σ has standard deviation
#: ``sqrt(1 + 16 + 36 + 16 + 1)·σ``, and the median of ``|N(0, 1)|`` is 0.6745.
_FOURTH_DIFFERENCE_NOISE = float(np.sqrt(70.0)) * 0.6745
#: Narrower floating types a loss may really have been computed in, widest first.
_NARROWER: tuple[type[np.floating], ...] = (np.float32, np.float16)


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


def resolution_floor(
    losses: npt.ArrayLike, taken: float, dtype: npt.DTypeLike, noise: float = 0.0
) -> float:
    """Smallest slope a difference quotient can resolve: one rounding step of the loss over the step.

    The rounding step is ``eps(dtype) · |L|``, or the measured ``noise`` of the loss evaluations
    when that is larger (absolute rounding inside the loss: a cross-entropy of 1e-10 computed from
    logits of 45 is rounded to about ``eps · 1``, not ``eps · 1e-10``).

    Example:
        >>> resolution_floor([2.0, 2.0], 1e-5, "float64") > 0
        True
        >>> resolution_floor([1e-10], 1e-5, "float64", noise=1e-16)
        1e-11
    """
    scale = float(np.max(np.abs(np.asarray(losses, dtype=np.float64))))
    if taken == 0.0:
        return float("inf")
    rounding = machine_eps(dtype) * max(scale, np.finfo(np.float64).tiny)
    return max(rounding, float(noise)) / abs(float(taken))


def effective_dtype(losses: npt.ArrayLike, dtype: npt.DTypeLike) -> np.dtype[np.floating]:
    """The narrowest floating dtype that holds every finite loss exactly: the loss's real precision.

    A loss computed in float32 and handed back as float64 (``F.binary_cross_entropy_with_logits(
    logits, y.float())`` on a float64 copy) has only float32 values; a loss really computed in
    float64 is float32-representable by chance with probability ``2**-29`` per value.

    Example:
        >>> str(effective_dtype([0.1, 0.2], "float64"))
        'float64'
        >>> str(effective_dtype(np.float32([0.1, 0.2]).astype(np.float64), "float64"))
        'float32'
    """
    best: np.dtype[np.floating] = np.dtype(dtype)  # type: ignore[assignment]
    values = np.asarray(losses, dtype=np.float64).ravel()
    values = values[np.isfinite(values) & (values != 0.0)]
    if values.size < 2:
        return best
    for narrow in _NARROWER:
        if machine_eps(narrow) <= machine_eps(best):
            continue
        with np.errstate(over="ignore"):
            exact = bool(np.all(values.astype(narrow).astype(np.float64) == values))
        if not exact:
            break
        best = np.dtype(narrow)
    return best


def richardson(numeric_h: float, numeric_half: float) -> float:
    """Central estimate with the ``O(h²)`` truncation removed: ``(4·D(h/2) − D(h)) / 3``.

    Near an optimum the truncation ``L''' h²/6`` can exceed the gradient itself; this removes it.

    Example:
        >>> richardson(1.0 + 4e-6, 1.0 + 1e-6)   # D(h) = g + c·h², D(h/2) = g + c·h²/4
        1.0
    """
    return (4.0 * float(numeric_half) - float(numeric_h)) / 3.0


@dataclass(frozen=True)
class FivePoints:
    """Losses at ``θ−h, θ−h/2, θ, θ+h/2, θ+h`` and the one-sided steps really taken (all > 0).

    Attributes:
        minus: ``L(θ−h)``.
        minus_half: ``L(θ−h/2)``.
        centre: ``L(θ)``.
        plus_half: ``L(θ+h/2)``.
        plus: ``L(θ+h)``.
        step_minus: ``θ − fl(θ−h)``.
        step_minus_half: ``θ − fl(θ−h/2)``.
        step_plus_half: ``fl(θ+h/2) − θ``.
        step_plus: ``fl(θ+h) − θ``.
    """

    minus: float
    minus_half: float
    centre: float
    plus_half: float
    plus: float
    step_minus: float
    step_minus_half: float
    step_plus_half: float
    step_plus: float

    def central(self, half: bool) -> float:
        """Central quotient at ``h`` (or ``h/2``)."""
        if half:
            return (self.plus_half - self.minus_half) / (self.step_plus_half + self.step_minus_half)
        return (self.plus - self.minus) / (self.step_plus + self.step_minus)

    def gap(self, half: bool) -> float:
        """One-sided gap, forward slope minus backward slope, at ``h`` (or ``h/2``)."""
        if half:
            forward = (self.plus_half - self.centre) / self.step_plus_half
            backward = (self.centre - self.minus_half) / self.step_minus_half
        else:
            forward = (self.plus - self.centre) / self.step_plus
            backward = (self.centre - self.minus) / self.step_minus
        return forward - backward

    def flat(self) -> bool:
        """Whether all five losses are bit-identical: the loss did not change at all."""
        return self.minus == self.minus_half == self.centre == self.plus_half == self.plus


def fourth_difference(p: FivePoints) -> float:
    """``L(θ+h) − 4L(θ+h/2) + 6L(θ) − 4L(θ−h/2) + L(θ−h)``, in loss units.

    Zero for any cubic, so at a smooth point it is rounding noise alone (the ``O(h⁴)`` term is far
    below it); at a kink it is of the order of ``jump · h``.

    Example:
        >>> p = FivePoints(1.0, 0.25, 0.0, 0.25, 1.0, 1.0, 0.5, 0.5, 1.0)   # L = θ², h = 1
        >>> fourth_difference(p)
        0.0
    """
    return p.plus - 4.0 * p.plus_half + 6.0 * p.centre - 4.0 * p.minus_half + p.minus


def noise_from_fourth_differences(diffs: npt.ArrayLike) -> float:
    """Standard deviation of the loss's rounding noise, pooled (median) over fourth differences.

    Returns 0 for fewer than :data:`MIN_NOISE_SAMPLES` values (one kink is no noise level).

    Example:
        >>> float(f"{noise_from_fourth_differences([5.643e-16, -5.643e-16, 5.643e-16]):.3g}")
        1e-16
        >>> noise_from_fourth_differences([1.0])
        0.0
    """
    d = np.abs(np.asarray(diffs, dtype=np.float64).ravel())
    d = d[np.isfinite(d)]
    if d.size < MIN_NOISE_SAMPLES:
        return 0.0
    return float(np.median(d)) / _FOURTH_DIFFERENCE_NOISE


def noise_sample(
    minus: float, centre: float, plus: float, step_minus: float, step_plus: float, curvature: float
) -> float:
    """One sample of the loss's rounding noise (standard deviation) from three nearby losses.

    The steps are tiny (``h/1024``): a kink between them is improbable, and the second difference
    ``step_m·(L₊ − L₀) + step_p·(L₋ − L₀)`` less its smooth part ``L''/2·step_p·step_m·(step_p +
    step_m)`` (``curvature`` = ``L''``, measured at ``h``) is rounding noise alone, of standard
    deviation ``σ·sqrt(step_m² + step_p² + (step_p + step_m)²)``.

    Example:
        >>> noise_sample(1.0, 1.0, 1.0, 1e-3, 1e-3, 0.0)       # no change at all: no noise seen
        0.0
        >>> noise_sample(1e-3, 0.0, 1e-3, 1e-3, 1e-3, 2e3)     # L = 1e3·θ², no noise
        0.0
    """
    up, down = float(step_plus), float(step_minus)
    second = down * (plus - centre) + up * (minus - centre)
    smooth = 0.5 * float(curvature) * up * down * (up + down)
    spread = float(np.sqrt(up * up + down * down + (up + down) ** 2))
    return abs(second - smooth) / spread


def kink_evidence(p: FivePoints) -> float:
    """How far the five losses are from any smooth function, as a slope (scale-free).

    Two measures; the larger counts:

    * the one-sided gap halves with ``h`` at a smooth point (it is ``L''·h``), so
      ``|gap(h) − 2·gap(h/2)|`` is rounding noise there, and of the order of the slope jump at a
      kink, whatever the size of the gradient;
    * the central estimates at ``h`` and ``h/2`` differ by ``L'''h²/8`` at a smooth point, a tiny
      fraction (:data:`SMOOTH_ALLOWANCE`) of the one-sided gap; a kink between ``h/2`` and ``h``
      (where the first measure is weak) moves only the estimate at ``h``.

    Example:
        >>> kink_evidence(FivePoints(1.0, 0.25, 0.0, 0.25, 1.0, 1.0, 0.5, 0.5, 1.0))   # L = θ²
        0.0
        >>> kink_evidence(FivePoints(1.0, 0.5, 0.0, 0.5, 1.0, 1.0, 0.5, 0.5, 1.0))     # L = |θ|
        2.0
    """
    ratio = (p.step_plus + p.step_minus) / (p.step_plus_half + p.step_minus_half)
    gap_h, gap_half = p.gap(half=False), ratio * p.gap(half=True)
    scaling = abs(gap_h - gap_half)
    natural = SMOOTH_ALLOWANCE * max(abs(gap_h), abs(gap_half))
    drift = max(0.0, abs(p.central(half=False) - p.central(half=True)) - natural)
    return max(scaling, drift)


def is_kink_by_scaling(deviation: float, p: FivePoints) -> bool:
    """Whether a kink inside the step can explain ``deviation`` (autodiff minus finite differences).

    Only evidence that the losses do not scale as a smooth function's counts, measured against the
    deviation it would have to explain (:data:`KINK_FRACTION`): a smooth point is never a kink,
    however small its gradient and however large its curvature.

    Example:
        >>> quad = FivePoints(1.0, 0.25, 0.0, 0.25, 1.0, 1.0, 0.5, 0.5, 1.0)   # θ² near 0
        >>> is_kink_by_scaling(1e-3, quad)
        False
        >>> is_kink_by_scaling(1.0, FivePoints(1.0, 0.5, 0.0, 0.5, 1.0, 1.0, 0.5, 0.5, 1.0))
        True
    """
    return kink_evidence(p) >= KINK_FRACTION * abs(float(deviation))


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
