"""Health rules on gradient-norm streams: vanishing, exploding, non-finite — as episodes.

Rules compare the RMS of a tensor's gradient, ``‖g‖₂ / √numel``, so thresholds do not depend on
layer size. An event is emitted when a condition starts (after ``patience`` consecutive
observations for vanishing) and not again for that tensor until the episode has ended, which
takes a value back beyond twice its threshold (:data:`HYSTERESIS`): a value hovering at a
threshold is one episode, not one per crossing.

Vanishing ("too small to learn"):

* **absolute**: gradient RMS below ``vanish_threshold = 1e-7`` (DeepDiagnosis flags mean
  ``|g| < 1e-7``; the RMS is at least the mean absolute value).
* **relative** (when weight norms are known — the callbacks provide them once per block): a
  weight tensor (two or more dimensions) whose ``‖g‖/‖w‖`` is below ``vanish_factor = 1e-5``
  times the median of ``‖g‖/‖w‖`` over the model's weight tensors. Measured on 40-step Adam fits:
  the first ``MultiHeadAttention``'s query/key kernels of a Keras transformer encoder sit at
  1.8e-4 to 4.4e-4 times the median from the first step on while accuracy rises (so 1e-3, the
  design's starting point, warned at every step); MobileNetV3Small's worst learning tensor at
  5e-3; Lightning's demo ``Transformer`` at 8e-2; the first five layers of a 20-layer sigmoid MLP
  at 4e-9 to 7e-6 (PyTorch) and 4e-7 to 8e-6 (Keras), besides gradient RMS of 1e-18 to 1e-14.
* **first/last** (only without weight norms: ``inspect`` on foreign logs): AUTOTRAINER's rule, a
  weight whose gradient RMS is below ``vanish_ratio = 1e-3`` times that of the weight nearest the
  loss and below ``vanish_ceiling = 1e-4``.

Exempt (structurally zero, evidence required): 1-D tensors of a layer that has a weight (a conv
bias before BatchNorm is judged through the conv's kernel); a tensor whose gradient is exactly
zero from its first observation; a tensor whose entries a gradient check labelled ``zero``
(:meth:`HealthMonitor.mark_zero`); and, observation by observation, a tensor whose gradient is at
rounding level — at most :data:`ROUNDING_RATIO` times the largest gradient RMS of the other
tensors of its layer while those are healthy. Measured: Keras ``MultiHeadAttention``'s key bias
(softmax ignores a per-query shift) at 1e-7 to 3e-6 of its key kernel, MobileNetV3Small's
``*_project_bn/beta`` (BatchNorm → 1×1 conv → BatchNorm) at 1.5e-7 to 4.5e-7 of their gamma;
learning tensors never below 5e-3 of their layer's largest.

The vanishing limits and the exemptions are computed in :mod:`gradwatch.core.vanish_limits`; this
module keeps the episodes, the history and the exploding rule.

Exploding: RMS above ``explode_threshold = 1e3`` (far beyond any healthy run measured here, 1e-5
to 1e-1), or above ``jump_factor = 1e3`` times the median of the tensor's last ``window``
observations (after ``min_history``), well above the 10-100× swings of loss spikes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch.core.vanish_limits import ROUNDING_RATIO, VanishLimits, layer_prefix
from gradwatch.report import GradientEvent

__all__ = [
    "HYSTERESIS",
    "ROUNDING_RATIO",
    "SKIPPED_STEPS_EVENT",
    "HealthMonitor",
    "HealthThresholds",
    "layer_prefix",
    "skipped_steps_event",
]

#: Consecutive optimizer steps a loss scaler skipped before the collapsing scale is an event.
SKIPPED_STEPS_EVENT = 10
#: An episode ends when the value is back beyond this factor of its threshold (above twice a
#: vanishing threshold, below half an exploding one).
HYSTERESIS = 2.0


@dataclass(frozen=True)
class HealthThresholds:
    """Thresholds of the health rules (see the module docstring for each default's reason).

    Example:
        >>> HealthThresholds(patience=5).patience
        5
    """

    vanish_threshold: float = 1e-7
    vanish_factor: float = 1e-5
    vanish_ratio: float = 1e-3
    vanish_ceiling: float = 1e-4
    explode_threshold: float = 1e3
    jump_factor: float = 1e3
    window: int = 20
    min_history: int = 10
    patience: int = 3

    def __post_init__(self) -> None:
        for name in (
            "vanish_threshold",
            "vanish_factor",
            "vanish_ratio",
            "vanish_ceiling",
            "explode_threshold",
            "jump_factor",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("window", "min_history", "patience"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def skipped_steps_event(
    step: int, skipped: int, scale: float, scaler: str = "loss scaler"
) -> GradientEvent:
    """The event of a loss scaler that skipped ``skipped`` steps in a row (its scale collapsing).

    Skipped steps are routine under float16 mixed precision (the scaler lowers its scale and
    retries); only a run of :data:`SKIPPED_STEPS_EVENT` of them is an event. ``scaler`` names it
    in the framework's words (Lightning: ``"GradScaler"``).

    Example:
        >>> skipped_steps_event(40, 10, 2.0**-6).kind
        'nonfinite'
    """
    return GradientEvent(
        step=step,
        kind="nonfinite",
        param="global",
        value=float(skipped),
        threshold=float(SKIPPED_STEPS_EVENT),
        message=(
            f"the {scaler} skipped {skipped} optimizer steps in a row (overflowing gradients, "
            f"loss scale {scale:.3g}): the loss scale is collapsing; try bf16 mixed precision, a "
            f"lower learning rate or gradient clipping"
        ),
    )


class HealthMonitor:
    """Turns per-tensor gradient RMS values into :class:`~gradwatch.GradientEvent` episodes.

    Args:
        shapes: Tensor name → shape, in model order (the last weight is "nearest the loss").
        thresholds: Rule thresholds.

    Example:
        >>> mon = HealthMonitor({"fc.weight": (2, 2), "fc.bias": (2,)}, HealthThresholds(patience=1))
        >>> [e.kind for e in mon.observe(1, {"fc.weight": float("nan"), "fc.bias": 1.0})]
        ['nonfinite']
        >>> mon.observe(2, {"fc.weight": float("nan"), "fc.bias": 1.0})   # same episode
        []
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], thresholds: HealthThresholds) -> None:
        self.thresholds = thresholds
        self.order = list(shapes)
        # What the vanishing rules know of the tensors: weights, followers, evidence of zeros.
        self._limits = VanishLimits(shapes, thresholds)
        self.weights = self._limits.weights
        self.followers = self._limits.followers
        self.reference = self._limits.reference
        self._count: dict[str, int] = {}
        self._active: set[str] = set()
        self._structural: set[str] = set()
        self._seen: set[str] = set()
        # Recent history as a ring buffer, one row per tensor (vectorised per-step work).
        self._index: dict[str, int] = {}
        self._ring = np.zeros((0, thresholds.window))
        self._pos = np.zeros(0, dtype=np.int64)
        self._filled = np.zeros(0, dtype=np.int64)
        for name in self.order:
            self._row(name)
        n = len(self.order)
        self._fast_ready = n > 0
        self._all_rows = np.arange(n)

    # -- evidence from outside ---------------------------------------------------------------
    def observe_weights(self, norms: Mapping[str, float]) -> None:
        """The weights' L2 norms ``‖w‖`` (name → norm): switches on the relative vanishing rule.

        The callbacks call it once per block of observations; the latest norms are used until the
        next call. Tensors left out (or with a zero norm) are not judged by the relative rule.

        Example:
            >>> mon = HealthMonitor({"a": (2, 2), "b": (2, 2), "c": (2, 2)}, HealthThresholds(patience=1))
            >>> mon.observe_weights({"a": 2.0, "b": 2.0, "c": 2.0})
            >>> [e.param for e in mon.observe(0, {"a": 1e-6, "b": 1e-1, "c": 1e-1})]
            ['a']
        """
        self._limits.observe_weights(norms)

    def mark_zero(self, labels: Mapping[str, bool]) -> None:
        """What a gradient check found: name → whether all its checked entries were ``zero``.

        A tensor labelled ``True`` is structurally zero — exempt from vanishing while another
        tensor of its layer is healthy — until a later check labels it ``False`` (an entry with a
        measurable derivative).

        Example:
            >>> mon = HealthMonitor({"k.w": (2, 2), "k.b": (2, 2)}, HealthThresholds(patience=1))
            >>> mon.mark_zero({"k.b": True})
            >>> mon.observe(0, {"k.w": 1e-2, "k.b": 1e-8})
            []
        """
        self._limits.mark_zero(labels)

    # -- history -----------------------------------------------------------------------------
    def _row(self, name: str) -> int:
        i = self._index.get(name)
        if i is None:
            i = len(self._index)
            self._index[name] = i
            self._ring = np.vstack([self._ring, np.zeros((1, self.thresholds.window))])
            self._pos = np.append(self._pos, 0)
            self._filled = np.append(self._filled, 0)
        return i

    def _history(self, name: str) -> np.ndarray:
        """The tensor's recent values, oldest first."""
        i = self._index.get(name)
        if i is None:
            return np.zeros(0)
        k, pos = int(self._filled[i]), int(self._pos[i])
        row = self._ring[i]
        if k < self.thresholds.window:
            return np.array(row[:k])
        return np.array(np.concatenate([row[pos:], row[:pos]]))

    def _push(self, rows: np.ndarray, values: np.ndarray) -> None:
        self._ring[rows, self._pos[rows]] = values
        self._pos[rows] = (self._pos[rows] + 1) % self.thresholds.window
        self._filled[rows] = np.minimum(self._filled[rows] + 1, self.thresholds.window)

    # -- conditions ------------------------------------------------------------------------
    def _vanish_limits(self, block: np.ndarray) -> np.ndarray:
        """Each value's vanishing threshold (rows of ``block`` in model order; 0: not judged)."""
        return self._limits.of(block, self._structural)

    def _explode_limit(self, name: str) -> float:
        """The value above which ``name`` is exploding now (absolute, or a jump over its median)."""
        th = self.thresholds
        limit = th.explode_threshold
        hist = self._history(name)
        if len(hist) >= th.min_history:
            med = float(np.median(hist))
            if med > 0:
                limit = min(limit, th.jump_factor * med)
        return limit

    # -- episodes --------------------------------------------------------------------------
    def _episode(self, key: str, on: bool, clear: bool, patience: int) -> bool:
        """Advance one condition; True exactly when an episode starts now.

        ``on``: the condition holds. ``clear``: the value is back beyond :data:`HYSTERESIS` times
        its threshold, which alone ends an open episode; a count towards ``patience`` needs
        consecutive observations.
        """
        if on:
            self._count[key] = self._count.get(key, 0) + 1
            if key not in self._active and self._count[key] >= patience:
                self._active.add(key)
                return True
            return False
        if clear:
            self._active.discard(key)
        if key not in self._active:
            self._count.pop(key, None)
        return False

    def _quiet(self, rms: Mapping[str, float]) -> bool:
        """True when this observation starts, continues and ends nothing (see :meth:`_block_quiet`).

        Then only the history needs updating; the per-tensor rules below run only on steps where
        something is, or was, going on.
        """
        if len(rms) != len(self.order):
            return False
        try:
            v = np.fromiter((rms[n] for n in self.order), dtype=np.float64, count=len(self.order))
        except KeyError:
            return False
        return self._block_quiet(v[None, :])

    def observe_block(
        self, steps: Sequence[int], names: Sequence[str], rms: np.ndarray
    ) -> list[GradientEvent]:
        """Feed several observations at once (row ``i`` of ``rms`` is step ``steps[i]``).

        Gives exactly the events that :meth:`observe` row by row gives: when the whole block
        provably starts, continues and ends nothing (a few reductions over the block), only the
        history is updated; otherwise the rows go through :meth:`observe` one by one.

        Example:
            >>> mon = HealthMonitor({"w": (2, 2)}, HealthThresholds(patience=1))
            >>> [e.step for e in mon.observe_block([0, 1], ["w"], np.array([[0.1], [float("nan")]]))]
            [1]
        """
        rows = np.asarray(rms, dtype=np.float64).reshape(len(steps), len(names))
        if len(steps) and list(names) == self.order and self._block_quiet(rows):
            return []
        events: list[GradientEvent] = []
        for step, row in zip(steps, rows, strict=True):
            events.extend(self.observe(int(step), dict(zip(names, row.tolist(), strict=True))))
        return events

    def _block_quiet(self, block: np.ndarray) -> bool:
        """Vectorised: True when these rows (in model order) start, continue and end nothing.

        A handful of reductions, whatever the number of tensors and rows; pushes the rows into the
        history when True.
        """
        k = block.shape[0]
        th = self.thresholds
        if not self._fast_ready or self._count or self._active or k > th.window:
            return False
        if len(self._seen) < len(self.order):
            return False
        if not block.max() <= th.explode_threshold:  # NaN fails every comparison
            return False
        if (block < self._vanish_limits(block)).any():
            return False
        structural = [self._index[n] for n in self._structural if n in self._index]
        if structural and np.any(block[:, structural] != 0.0):
            return False
        # Every median a row is judged against is at least the minimum of the history and of the
        # block: no value above jump_factor times that minimum means no jump anywhere. (Unfilled
        # slots hold 0, so young tensors always fail this.) A single row that fails it gets the
        # exact test: its value against the median of each ready tensor's history.
        lowest = np.minimum(self._ring.min(axis=1), block.min(axis=0))
        maybe = block > th.jump_factor * lowest
        if maybe.any():
            if k > 1:
                return False
            ready = self._filled >= th.min_history
            for i in np.nonzero(maybe[0] & ready)[0]:
                med = float(np.median(self._history(self.order[i])))
                if med > 0 and block[0, i] > th.jump_factor * med:
                    return False
        cols = (self._pos[:, None] + np.arange(k)[None, :]) % th.window
        self._ring[self._all_rows[:, None], cols] = block.T
        self._pos += k
        self._pos %= th.window
        np.minimum(self._filled + k, th.window, out=self._filled)
        return True

    def observe(self, step: int, rms: Mapping[str, float]) -> list[GradientEvent]:
        """Feed one observation (tensor name → gradient RMS); returns the events that start now."""
        if self._quiet(rms):
            return []
        events: list[GradientEvent] = []
        bad = [n for n, v in rms.items() if not math.isfinite(v)]
        if self._episode("nonfinite:global", bool(bad), not bad, 1):
            events.append(_nonfinite_event(step, bad))
        for name, value in rms.items():
            if not math.isfinite(value):
                continue
            if name not in self._seen:
                self._seen.add(name)
                if value == 0.0:
                    self._structural.add(name)
            elif name in self._structural and value != 0.0:
                self._structural.discard(name)
        limits = self._row_limits(rms)
        for name, value in rms.items():
            if not math.isfinite(value):
                continue
            event = self._judge(
                step, name, value, limits.get(name, self.thresholds.vanish_threshold)
            )
            events.extend(event)
            i = self._row(name)
            self._push(np.array([i]), np.array([value]))
        return events

    def _row_limits(self, rms: Mapping[str, float]) -> dict[str, float]:
        """:meth:`_vanish_limits` of one observation, by name (tensors of the model only)."""
        row = np.array([rms.get(n, math.nan) for n in self.order], dtype=np.float64)
        row = np.where(np.isfinite(row), row, np.nan)
        limits = self._vanish_limits(row[None, :])[0]
        return dict(zip(self.order, limits.tolist(), strict=True))

    def _judge(self, step: int, name: str, value: float, limit: float) -> list[GradientEvent]:
        """The vanishing and exploding episodes of one finite value; the events that start."""
        th = self.thresholds
        events: list[GradientEvent] = []
        vanishing = value < limit
        cleared = limit == 0.0 or value > HYSTERESIS * limit
        if self._episode(f"vanishing:{name}", vanishing, cleared, th.patience):
            events.append(self._vanishing_event(step, name, value, limit))
        top = self._explode_limit(name)
        if self._episode(f"exploding:{name}", value > top, value <= top / HYSTERESIS, 1):
            events.append(
                GradientEvent(
                    step=step,
                    kind="exploding",
                    param=name,
                    value=value,
                    threshold=top,
                    message=(
                        f"the gradient of {name} has RMS {value:.3g}, above {top:.3g}: lower "
                        f"the learning rate, clip gradients or check the initialisation"
                    ),
                )
            )
        return events

    def _vanishing_event(self, step: int, name: str, value: float, limit: float) -> GradientEvent:
        th = self.thresholds
        why = f"RMS {value:.3g} below {limit:.3g}"
        if (
            limit > th.vanish_threshold
            and self._limits.weight_rms is not None
            and name in self._index
        ):
            w = float(self._limits.weight_rms[self.order.index(name)])
            why = (
                f"‖g‖/‖w‖ = {value / w:.3g}, below {th.vanish_factor:g} × the median over the "
                f"model's weight tensors ({limit / w:.3g})"
            )
        elif limit > th.vanish_threshold:
            why = f"RMS {value:.3g}, below {th.vanish_ratio:g} × that of {self.reference}"
        return GradientEvent(
            step=step,
            kind="vanishing",
            param=name,
            value=value,
            threshold=limit,
            message=(
                f"the gradient of {name} has {why} for {th.patience} observations, so it barely "
                f"learns: try a ReLU-family activation, normalisation, residual connections or "
                f"another initialisation"
            ),
        )

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (patience counters, open episodes, recent history, evidence)."""
        weights = {}
        if self._limits.weight_rms is not None:
            weights = {
                n: float(x * math.sqrt(k))
                for n, x, k in zip(
                    self.order, self._limits.weight_rms, self._limits.numel, strict=True
                )
                if math.isfinite(x)
            }
        return {
            "history": {k: self._history(k).tolist() for k in self._index},
            "count": dict(self._count),
            "active": sorted(self._active),
            "structural": sorted(self._structural),
            "zero": sorted(self._limits.zero),
            "seen": sorted(self._seen),
            "weight_norms": weights,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name, values in state.get("history", {}).items():
            i = self._row(name)
            self._filled[i] = 0
            self._pos[i] = 0
            tail = [float(x) for x in values][-self.thresholds.window :]
            if tail:
                for x in tail:
                    self._push(np.array([i]), np.array([x]))
        self._count = {str(k): int(v) for k, v in state.get("count", {}).items()}
        self._active = set(state.get("active", ()))
        self._structural = set(state.get("structural", ()))
        self._limits.zero = set(state.get("zero", ()))
        self._seen = set(state.get("seen", ()))
        if state.get("weight_norms"):
            self.observe_weights({str(k): float(v) for k, v in state["weight_norms"].items()})


def _nonfinite_event(step: int, bad: Sequence[str]) -> GradientEvent:
    """The one global event of a step whose gradients hold NaN or inf."""
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return GradientEvent(
        step=step,
        kind="nonfinite",
        param="global",
        value=float(len(bad)),
        threshold=0.0,
        message=(
            f"gradients of {len(bad)} tensor(s) are NaN or inf ({shown}): lower the learning "
            f"rate, guard the loss against log(0) or division by zero, or clip gradients"
        ),
    )
