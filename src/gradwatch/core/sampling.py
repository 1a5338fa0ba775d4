"""Which coordinates and directions a check looks at.

Uniform sampling over all coordinates misses bugs confined to small tensors (a sign-flipped bias:
20 misses in 20 seeds, DESIGN §3); stratifying by tensor catches them every time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "allocate",
    "random_direction",
    "round_robin",
    "sample_coordinates",
    "sample_index",
]


def allocate(sizes: Sequence[int], budget: int) -> list[int]:
    """Spread ``budget`` coordinates over tensors of the given sizes.

    Every tensor gets at least one coordinate (so a model with more tensors than ``budget`` gets one
    each), bigger tensors get more, in proportion to their size (largest remainder), and no tensor
    gets more coordinates than it has.

    Example:
        >>> allocate([1000, 10, 1], 8)
        [6, 1, 1]
        >>> allocate([5, 5, 5], 2)
        [1, 1, 1]
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget!r}")
    n = len(sizes)
    counts = [1 if s > 0 else 0 for s in sizes]
    extra = budget - sum(counts)
    if extra <= 0:
        return counts
    room = [max(0, s - c) for s, c in zip(sizes, counts, strict=True)]
    while extra > 0 and sum(room) > 0:
        total = float(sum(room))
        shares = [extra * r / total for r in room]
        add = [min(math.floor(x), r) for x, r in zip(shares, room, strict=True)]
        left = extra - sum(add)
        order = sorted(range(n), key=lambda i: shares[i] - add[i], reverse=True)
        for i in order:
            if left <= 0:
                break
            if add[i] < room[i]:
                add[i] += 1
                left -= 1
        if sum(add) == 0:
            break
        for i in range(n):
            counts[i] += add[i]
            room[i] -= add[i]
        extra -= sum(add)
    return counts


def sample_index(
    shape: Sequence[int], rng: np.random.Generator, exclude: set[tuple[int, ...]] | None = None
) -> tuple[int, ...] | None:
    """One coordinate of a tensor of ``shape`` not in ``exclude``; ``None`` when all are taken.

    Example:
        >>> sample_index((2, 3), np.random.default_rng(0)) in {(i, j) for i in range(2) for j in range(3)}
        True
    """
    size = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    taken = exclude or set()
    if len(taken) >= size:
        return None
    for _ in range(64):
        flat = int(rng.integers(size))
        idx = tuple(int(i) for i in np.unravel_index(flat, tuple(shape))) if len(shape) else ()
        if idx not in taken:
            return idx
    for flat in range(size):  # dense exclusion: scan deterministically
        idx = tuple(int(i) for i in np.unravel_index(flat, tuple(shape))) if len(shape) else ()
        if idx not in taken:
            return idx
    return None


def sample_coordinates(
    shapes: Sequence[Sequence[int]], budget: int, rng: np.random.Generator
) -> list[list[tuple[int, ...]]]:
    """Stratified coordinates: for each tensor, distinct indices as :func:`allocate` decides.

    Example:
        >>> picks = sample_coordinates([(4, 4), (4,)], 5, np.random.default_rng(0))
        >>> [len(p) for p in picks]
        [4, 1]
    """
    sizes = [int(np.prod(s, dtype=np.int64)) if len(s) else 1 for s in shapes]
    counts = allocate(sizes, budget)
    picks: list[list[tuple[int, ...]]] = []
    for shape, size, count in zip(shapes, sizes, counts, strict=True):
        if count >= size:
            chosen = range(size)
        else:
            chosen = rng.choice(size, size=count, replace=False).tolist()
        picks.append(
            [
                tuple(int(i) for i in np.unravel_index(int(f), tuple(shape))) if len(shape) else ()
                for f in chosen
            ]
        )
    return picks


def random_direction(shape: Sequence[int], rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A random unit vector (Gaussian, normalised) shaped like the tensor.

    Example:
        >>> u = random_direction((3, 2), np.random.default_rng(0))
        >>> round(float(np.linalg.norm(u)), 12)
        1.0
    """
    u = rng.standard_normal(tuple(shape))
    norm = float(np.linalg.norm(u))
    if norm == 0.0:
        u = np.ones(tuple(shape))
        norm = float(np.linalg.norm(u))
    return np.asarray(u / norm, dtype=np.float64)


def round_robin(n_tensors: int, budget: int, check_index: int) -> list[int]:
    """Tensors visited by check number ``check_index`` when a check may cover only ``budget``.

    With ``n_tensors <= budget`` every tensor is visited. Otherwise the tensors are dealt into
    ``p = ceil(n_tensors / budget)`` strided groups and check ``k`` takes group ``k mod p``: the
    tensors ``i`` with ``i ≡ k (mod p)``. Every check spans the whole depth of the model (first,
    middle and last tensors, so a wrong backward shows between tensors that fail and tensors nearer
    the loss that pass), and every tensor is checked within ``p`` checks.

    Example:
        >>> round_robin(5, 2, 0), round_robin(5, 2, 1), round_robin(5, 2, 2)
        ([0, 3], [1, 4], [2])
        >>> round_robin(67, 32, 0)[:3], round_robin(67, 32, 0)[-1]
        ([0, 3, 6], 66)
    """
    if n_tensors <= budget:
        return list(range(n_tensors))
    period = -(-n_tensors // budget)
    return list(range(check_index % period, n_tensors, period))
