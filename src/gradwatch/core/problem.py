"""What the check engine needs from a framework adapter: a :class:`Problem` and its perturbations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["MODES", "Perturbation", "Problem", "excluded_entries"]

MODES: tuple[str, ...] = ("coordinate", "directional")


@dataclass(frozen=True)
class Perturbation:
    """Set tensor ``tensor`` (at ``index``, or whole when ``index is None``) to ``value``.

    ``value`` is already rounded to the dtype the model holds, so the adapter writes it as it is.
    """

    tensor: int
    index: tuple[int, ...] | None
    value: npt.NDArray[np.floating]


class Problem(Protocol):
    """What the engine needs from a framework adapter."""

    @property
    def names(self) -> Sequence[str]:
        """Tensor names, in model order."""
        ...

    @property
    def shapes(self) -> Sequence[tuple[int, ...]]:
        """Tensor shapes."""
        ...

    @property
    def dtype(self) -> np.dtype[np.floating]:
        """The dtype the check computes in (parameters are held in it)."""
        ...

    @property
    def base_loss(self) -> float:
        """Loss at the unperturbed parameters."""
        ...

    def values(self, tensor: int) -> npt.NDArray[np.floating]:
        """Current values of a tensor (host copy)."""
        ...

    def gradient(self, tensor: int) -> npt.NDArray[np.floating] | None:
        """Autodiff gradient of a tensor (dense host copy); ``None`` when there is no autograd path."""
        ...

    def losses(self, perturbations: Sequence[Perturbation]) -> npt.NDArray[np.float64]:
        """Loss at each perturbation, applied one at a time; the model is restored after each."""
        ...


def excluded_entries(problem: Problem, tensor: int) -> npt.NDArray[np.bool_] | None:
    """The entries of a tensor the check must leave alone, if the adapter names any.

    An adapter may define ``excluded(tensor)``: a boolean mask of entries whose autodiff gradient
    the framework defines as zero although the loss depends on them — torch's
    ``nn.Embedding(padding_idx=...)`` row, which "does not contribute to the gradient" by design.
    Finite differences would see the loss change there and report a bug that is a documented
    choice, so those entries are never sampled and directions are zero on them.

    Example:
        >>> class P:
        ...     def excluded(self, t): return np.array([True, False])
        >>> excluded_entries(P(), 0).tolist(), excluded_entries(object(), 0)
        ([True, False], None)
    """
    find = getattr(problem, "excluded", None)
    if find is None:
        return None
    mask = find(tensor)
    if mask is None or not np.any(mask):
        return None
    return np.asarray(mask, dtype=bool)
