"""The vanishing threshold of each gradient RMS: absolute, relative, first/last — structural zeros exempt.

The rules (the measurements behind each default are in :mod:`gradwatch.core.health`):

* **absolute**: gradient RMS below ``vanish_threshold``;
* **relative** (when weight norms are known, :meth:`VanishLimits.observe_weights`): a weight tensor
  whose ``‖g‖/‖w‖`` is below ``vanish_factor`` times the median of ``‖g‖/‖w‖`` over the model's
  weight tensors;
* **first/last** (only without weight norms): a weight whose gradient RMS is below
  ``vanish_ratio`` times that of the weight nearest the loss and below ``vanish_ceiling``.

Exempt (structurally zero, evidence required): 1-D tensors of a layer that has a weight; a tensor
whose gradient is exactly zero from its first observation (the caller's ``structural`` set); a
tensor whose entries a gradient check labelled ``zero`` (:meth:`VanishLimits.mark_zero`); and,
observation by observation, a tensor whose gradient is at rounding level — at most
:data:`ROUNDING_RATIO` times the largest gradient RMS of the other tensors of its layer while those
are healthy.

:class:`~gradwatch.core.health.HealthMonitor` owns one :class:`VanishLimits` and keeps the episodes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gradwatch.core.health import HealthThresholds

__all__ = ["ROUNDING_RATIO", "VanishLimits", "layer_neighbours", "layer_prefix"]

#: A gradient RMS at most this fraction of the largest of its (healthy) layer neighbours is
#: rounding noise of a true zero (see :mod:`gradwatch.core.health` for the measurements).
ROUNDING_RATIO = 1e-4


def layer_prefix(name: str) -> str:
    """The layer part of a parameter name: ``"fc1.bias"`` → ``"fc1"``, ``"seq/dense/bias"`` → ``"seq/dense"``.

    Example:
        >>> layer_prefix("net.0.weight"), layer_prefix("model/dense_1/kernel"), layer_prefix("w")
        ('net.0', 'model/dense_1', '')
    """
    cut = max(name.rfind("."), name.rfind("/"))
    return name[:cut] if cut > 0 else ""


def layer_neighbours(order: Sequence[str]) -> dict[int, np.ndarray]:
    """Column → columns of the other tensors of its layer (same :func:`layer_prefix`)."""
    layers: dict[str, list[int]] = {}
    for i, name in enumerate(order):
        prefix = layer_prefix(name)
        if prefix:
            layers.setdefault(prefix, []).append(i)
    return {
        i: np.array([j for j in members if j != i])
        for members in layers.values()
        if len(members) > 1
        for i in members
    }


class VanishLimits:
    """What the vanishing rules know of the model's tensors, and each value's threshold.

    Args:
        shapes: Tensor name → shape, in model order (the last weight is "nearest the loss").
        thresholds: Rule thresholds.

    Example:
        >>> from gradwatch.core.health import HealthThresholds
        >>> limits = VanishLimits({"fc.weight": (2, 2), "fc.bias": (2,)}, HealthThresholds())
        >>> limits.of(np.array([[1e-3, 1e-3]]), set()).tolist()   # the bias follows its weight
        [[1e-07, 0.0]]
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], thresholds: HealthThresholds) -> None:
        self.thresholds = thresholds
        self.order = list(shapes)
        self.numel = np.array([max(1, math.prod(s)) for s in shapes.values()], dtype=np.float64)
        weights = [n for n, s in shapes.items() if len(s) >= 2]
        weight_layers = {layer_prefix(n) for n in weights}
        self.weights = set(weights)
        self.followers = {
            n
            for n, s in shapes.items()
            if len(s) < 2 and layer_prefix(n) in weight_layers and layer_prefix(n) != ""
        }
        self.reference = weights[-1] if weights else None
        #: Tensors a gradient check labelled ``zero`` (:meth:`mark_zero`).
        self.zero: set[str] = set()
        #: The weights' RMS (``‖w‖ / √numel``) in model order, once known; ``NaN``: not judged.
        self.weight_rms: np.ndarray | None = None
        self._is_weight = np.array([x in self.weights for x in self.order], dtype=bool)
        self._follower = np.array([x in self.followers for x in self.order], dtype=bool)
        self._not_ref = np.array([x != self.reference for x in self.order], dtype=bool)
        self._ref_index = self.order.index(self.reference) if self.reference is not None else -1
        self._neighbours = layer_neighbours(self.order)
        self._exempt_cache: tuple[frozenset[str], np.ndarray] | None = None

    def observe_weights(self, norms: Mapping[str, float]) -> None:
        """The weights' L2 norms ``‖w‖`` (name → norm): switches on the relative rule."""
        values = [norms.get(n, math.nan) for n in self.order]
        rms = np.array(values, dtype=np.float64) / np.sqrt(self.numel)
        self.weight_rms = np.where(np.isfinite(rms) & (rms > 0), rms, np.nan)

    def mark_zero(self, labels: Mapping[str, bool]) -> None:
        """What a gradient check found: name → whether all its checked entries were ``zero``."""
        for name, zero in labels.items():
            if zero:
                self.zero.add(name)
            else:
                self.zero.discard(name)

    def _exempt(self, structural: set[str]) -> np.ndarray:
        """Tensors exempt from vanishing whatever their values: followers, zeros from the start."""
        key = frozenset(structural)
        if self._exempt_cache is None or self._exempt_cache[0] != key:
            zero = np.array([n in key for n in self.order], dtype=bool)
            self._exempt_cache = (key, self._follower | zero)
        return self._exempt_cache[1]

    def of(self, block: np.ndarray, structural: set[str]) -> np.ndarray:
        """Each value's vanishing threshold (rows of ``block`` in model order; 0: not judged).

        ``NaN`` marks a tensor not observed in that row. Example: with weight norms known, a
        weight's threshold is the larger of ``vanish_threshold`` and ``vanish_factor`` times the
        row's median ``‖g‖/‖w‖`` times its own weight RMS.
        """
        th = self.thresholds
        exempt = self._exempt(structural)
        limits = np.where(exempt, 0.0, th.vanish_threshold)[None, :].repeat(len(block), axis=0)
        if self.weight_rms is not None:
            w = self.weight_rms
            cols = self._is_weight & ~exempt & np.isfinite(w)
            if cols.any():
                with np.errstate(all="ignore"):
                    ratio = block[:, cols] / w[cols]
                finite = np.isfinite(ratio)
                if finite.all():  # the every-block path: a plain median, no warning machinery
                    median = np.median(ratio, axis=1)
                else:
                    ratio = np.where(finite, ratio, np.nan)
                    with np.errstate(all="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row
                        median = np.nanmedian(ratio, axis=1)
                relative = th.vanish_factor * median[:, None] * w[cols][None, :]
                limits[:, cols] = np.fmax(limits[:, cols], relative)
        elif self._ref_index >= 0:
            ref = block[:, self._ref_index]
            good = np.isfinite(ref) & (ref > 0)
            first_last = np.where(good, np.minimum(th.vanish_ceiling, th.vanish_ratio * ref), 0.0)
            cols = self._is_weight & ~exempt & self._not_ref
            limits[:, cols] = np.fmax(limits[:, cols], first_last[:, None])
        self._clear_rounding(block, limits)
        return limits

    def _clear_rounding(self, block: np.ndarray, limits: np.ndarray) -> None:
        """Set to 0 the limits of structural zeros: values next to a healthy layer neighbour that
        are at rounding level, or that a check labelled ``zero``.

        A labelled tensor whose whole layer is small is still judged: a check also labels the
        entries of a truly vanishing gradient ``zero``.
        """
        th = self.thresholds
        with np.errstate(invalid="ignore"):
            below = (block < limits).any(axis=0)
        for i in np.nonzero(below)[0]:
            neighbours = self._neighbours.get(int(i))
            if neighbours is None:
                continue
            others = block[:, neighbours]
            top = np.where(np.isfinite(others), others, -np.inf).max(axis=1)
            labelled = self.order[i] in self.zero
            with np.errstate(invalid="ignore"):
                small = labelled | (block[:, i] <= ROUNDING_RATIO * top)
                limits[small & (top >= th.vanish_threshold), i] = 0.0
