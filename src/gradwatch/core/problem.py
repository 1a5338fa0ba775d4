"""What the check engine needs from a framework adapter: a :class:`Problem` and its perturbations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["MODES", "Perturbation", "Problem"]

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
