import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradwatch.core.sampling import (
    allocate,
    random_direction,
    round_robin,
    sample_coordinates,
    sample_index,
)


@given(
    sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=40),
    budget=st.integers(1, 200),
)
def test_allocate_covers_every_tensor_and_respects_sizes(sizes, budget):
    counts = allocate(sizes, budget)
    assert len(counts) == len(sizes)
    assert all(1 <= c <= s for c, s in zip(counts, sizes, strict=True))
    if len(sizes) >= budget:
        assert counts == [1] * len(sizes)
    else:
        assert sum(counts) == min(budget, sum(sizes))


def test_allocate_gives_bigger_tensors_more():
    counts = allocate([100_000, 1_000, 10], 32)
    assert counts[0] > counts[1] >= counts[2] == 1
    with pytest.raises(ValueError, match="budget"):
        allocate([3], 0)


def test_sample_coordinates_distinct_and_in_range():
    rng = np.random.default_rng(1)
    shapes = [(5, 7), (3,), (2, 2, 2), ()]
    picks = sample_coordinates(shapes, 20, rng)
    for shape, idxs in zip(shapes, picks, strict=True):
        assert len(set(idxs)) == len(idxs) >= 1
        for idx in idxs:
            assert len(idx) == len(shape)
            assert all(0 <= i < d for i, d in zip(idx, shape, strict=True))


def test_sample_coordinates_is_deterministic_for_a_seed():
    a = sample_coordinates([(50, 50), (50,)], 10, np.random.default_rng(7))
    b = sample_coordinates([(50, 50), (50,)], 10, np.random.default_rng(7))
    assert a == b


def test_stratified_sampling_catches_a_small_tensor_where_uniform_misses():
    # The bug sits in a 256-element bias next to a 270k-element weight (DESIGN §3).
    shapes = [(512, 528), (256,)]
    hits = 0
    for seed in range(20):
        picks = sample_coordinates(shapes, 32, np.random.default_rng(seed))
        hits += bool(picks[1])
    assert hits == 20
    uniform_hits = sum(
        bool(np.any(np.random.default_rng(s).integers(512 * 528 + 256, size=32) >= 512 * 528))
        for s in range(20)
    )
    assert uniform_hits < 5


def test_sample_index_excludes_and_exhausts():
    rng = np.random.default_rng(0)
    taken = {(0,), (1,)}
    assert sample_index((3,), rng, taken) == (2,)
    assert sample_index((2,), rng, taken) is None


def test_random_direction_is_unit_and_shaped():
    u = random_direction((4, 3), np.random.default_rng(0))
    assert u.shape == (4, 3)
    assert np.linalg.norm(u) == pytest.approx(1.0)


def test_round_robin_visits_every_tensor_within_a_few_checks():
    n, budget = 10, 4
    seen = set()
    for k in range(math.ceil(n / budget)):
        window = round_robin(n, budget, k)
        assert 0 < len(window) <= budget
        seen.update(window)
    assert seen == set(range(n))
    assert round_robin(3, 4, 5) == [0, 1, 2]


@pytest.mark.parametrize(("n", "budget"), [(67, 32), (10, 4), (100, 7), (33, 32), (64, 32)])
def test_round_robin_spans_the_depth_of_the_model_in_every_check(n, budget):
    # A wrong backward shows in every tensor upstream of it: each check must hold tensors near the
    # input, in the middle and near the loss, so it can say where the bug is (DESIGN §1).
    period = math.ceil(n / budget)
    windows = [round_robin(n, budget, k) for k in range(period)]
    assert set().union(*windows) == set(range(n))  # every tensor within ceil(n / budget) checks
    for k, window in enumerate(windows):
        assert len(window) <= budget and window == sorted(window)
        assert window[0] < period  # first part
        assert window[-1] >= n - period  # last part
        assert any(n // 3 <= i < 2 * n // 3 for i in window)  # middle
        assert round_robin(n, budget, k + period) == window  # then round again


def test_round_robin_first_check_of_a_67_tensor_transformer():
    first = round_robin(67, 32, 0)
    assert first[0] == 0 and 33 in first and first[-1] == 66
