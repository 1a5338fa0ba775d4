import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradwatch.core import finite_diff as fd


def test_step_size_scales_with_parameter_magnitude_above_one():
    base = fd.step_size(0.0, "float64")
    assert base == pytest.approx(np.cbrt(np.finfo(np.float64).eps))
    assert fd.step_size(0.5, "float64") == base
    assert fd.step_size(-40.0, "float64") == pytest.approx(40 * base)
    assert fd.step_size(3.0, "float64", eps=1e-4) == pytest.approx(3e-4)


def test_float32_step_is_cube_root_of_float32_eps():
    assert fd.step_size(0.0, "float32") == pytest.approx(np.cbrt(np.finfo(np.float32).eps))


def test_perturbed_values_are_rounded_to_the_model_dtype():
    plus, minus = fd.perturbed_values(1.0, 1e-9, "float32")
    assert plus.dtype == np.float32 and float(plus) == 1.0 and float(minus) == 1.0
    plus, minus = fd.perturbed_values(1.0, 1e-9, "float64")
    assert float(plus) - float(minus) == pytest.approx(2e-9, rel=1e-6)


def test_central_difference_divides_by_the_step_taken_not_2h():
    # A linear loss L = 3θ: whatever rounding did to the step, the quotient is exactly the slope.
    theta = np.float32(0.3)
    plus, minus = fd.perturbed_values(theta, 1e-3, "float32")
    taken = float(plus) - float(minus)
    assert taken != pytest.approx(2e-3, rel=1e-9)
    q = fd.central_difference(3 * float(plus), 3 * float(minus), taken)
    assert q == pytest.approx(3.0, rel=1e-12)
    assert math.isnan(fd.central_difference(1.0, 1.0, 0.0))


def test_relative_error_and_floor():
    assert fd.relative_error(1.0, 1.1) == pytest.approx(0.1 / 1.1)
    assert fd.relative_error(0.0, 0.0) == 0.0
    # Rounding noise on both sides of a zero gradient is harmless against a floor.
    assert fd.relative_error(1e-15, -1e-15, floor=1e-6) < 1e-8
    assert fd.relative_error(float("nan"), 1.0) == float("inf")


@given(
    a=st.floats(-1e6, 1e6, allow_nan=False),
    n=st.floats(-1e6, 1e6, allow_nan=False),
    floor=st.floats(0, 10),
)
def test_relative_error_properties(a, n, floor):
    r = fd.relative_error(a, n, floor)
    assert 0.0 <= r <= 2.0
    assert r == pytest.approx(fd.relative_error(n, a, floor))
    if a == n:
        assert r == 0.0


def test_resolution_floor_is_one_rounding_step_of_the_loss_over_the_step():
    r = fd.resolution_floor([4.0, 4.0, 3.0], 1e-5, "float64")
    assert r == pytest.approx(np.finfo(np.float64).eps * 4.0 / 1e-5)
    assert fd.resolution_floor([1.0], 0.0, "float64") == float("inf")


def test_kink_test_compares_estimates_at_h_and_half_h():
    assert not fd.is_kink(0.5, 0.5 + 1e-10, 0.0, 5e-4)
    assert fd.is_kink(0.5, 0.25, 0.0, 5e-4)
    # Below the floor both estimates are noise: no kink claimed.
    assert not fd.is_kink(1e-12, -1e-12, 1e-6, 5e-4)


def test_tolerances_per_dtype():
    t64 = fd.tolerances_for("float64")
    t32 = fd.tolerances_for("float32")
    assert (t64.rtol, t64.kink_tol, t64.aggregate) == (1e-3, 5e-4, False)
    assert t32.aggregate and t32.rtol == 0.4
    assert fd.tolerances_for("float64", rtol=1e-2).rtol == 1e-2


def _five(f, h=1e-3):
    """FivePoints of ``f`` around 0 with symmetric steps ``h`` and ``h/2``."""
    return fd.FivePoints(f(-h), f(-h / 2), f(0.0), f(h / 2), f(h), h, h / 2, h / 2, h)


def test_effective_dtype_sees_a_float32_loss_inside_a_float64_check():
    rng = np.random.default_rng(0)
    real64 = rng.standard_normal(8)
    assert fd.effective_dtype(real64, "float64") == np.float64
    assert fd.effective_dtype(real64.astype(np.float32).astype(np.float64), "float64") == np.float32
    assert fd.effective_dtype(real64.astype(np.float16).astype(np.float64), "float64") == np.float16
    assert fd.effective_dtype([0.5], "float64") == np.float64  # one value proves nothing


def test_resolution_floor_takes_the_measured_noise_when_larger():
    assert fd.resolution_floor([1e-10], 1e-5, "float64", noise=1e-16) == pytest.approx(1e-11)
    assert fd.resolution_floor([1.0], 1e-5, "float64", noise=1e-30) == pytest.approx(2.22e-11)


def test_richardson_removes_the_h_squared_truncation():
    # Central differences of a cubic: D(h) = g + h²; D(h/2) = g + h²/4.
    assert fd.richardson(1e-15 + 1e-12, 1e-15 + 0.25e-12) == pytest.approx(1e-15, rel=1e-6)


def test_a_smooth_point_near_an_optimum_is_never_a_kink():
    # theta**2 at distance 3e-3 of its optimum (gradient 6e-3, curvature 2): the one-sided gap
    # h·L'' is 3% of the gradient, yet it halves with h, so there is no kink evidence at all.
    p = _five(lambda t: (t + 3e-3) ** 2)
    assert fd.kink_evidence(p) < 1e-12
    assert not fd.is_kink_by_scaling(3e-3, p)  # a halved gradient is a deviation of 3e-3
    # a smooth non-polynomial point with a tiny gradient: tanh(t)**2 near 0
    p = _five(lambda t: math.tanh(t + 1e-9) ** 2, h=6e-6)
    assert not fd.is_kink_by_scaling(1e-9, p)


@pytest.mark.parametrize("s", [-0.9, -0.5, -0.3, 0.0, 1 / 3, 3 / 7, 0.5, 0.7, 0.95])
def test_a_kink_anywhere_in_the_step_explains_its_deviation(s):
    # relu(t - s·h): autodiff at 0 gives the slope of the side 0 lies on; whatever the position
    # of the kink, the scaling evidence is large enough to explain what it does to the estimates.
    h = 1e-3
    p = _five(lambda t: max(0.0, t - s * h), h)
    autodiff = 0.0 if s > 0 else 1.0
    n_h = p.central(half=False)
    best = min((n_h, fd.richardson(n_h, p.central(half=True))), key=lambda n: abs(autodiff - n))
    if abs(autodiff - best) > 1e-12:
        assert fd.is_kink_by_scaling(abs(autodiff - best), p)


def test_noise_level_from_fourth_differences_and_tiny_steps():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2000, 5)) * 1e-16
    diffs = [fd.fourth_difference(fd.FivePoints(*row, 1.0, 0.5, 0.5, 1.0)) for row in noise]
    assert fd.noise_from_fourth_differences(diffs) == pytest.approx(1e-16, rel=0.1)
    assert fd.noise_from_fourth_differences(diffs[:2]) == 0.0
    samples = [fd.noise_sample(a, b, c, 1e-9, 1e-9, 0.0) for a, b, c in noise[:, :3]]
    assert np.median(samples) / 0.6745 == pytest.approx(1e-16, rel=0.15)
