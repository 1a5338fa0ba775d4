"""Health rules on gradient-norm streams: vanishing, exploding, non-finite — as episodes.

Every rule compares the RMS of a tensor's gradient, ``‖g‖₂ / √numel``, so thresholds do not depend
on layer size. An event is emitted when a condition starts (after ``patience`` observations for
vanishing) and not again for that tensor until the condition has cleared.

Defaults and their reasons:

* ``vanish_threshold = 1e-7``: DeepDiagnosis flags mean ``|g| < 1e-7``; the RMS is at least the
  mean absolute value, so this is at least as conservative.
* ``vanish_ratio = 1e-3`` below ``vanish_ceiling = 1e-4``: AUTOTRAINER's rule — a weight whose
  gradient is a thousandth of the layer nearest the loss, and small in absolute terms, is not
  learning. Measured here: a 14-layer sigmoid MLP's first layers sit at ratios of 1e-6 to 1e-8.
* ``explode_threshold = 1e3``: an RMS gradient of a thousand per element is far beyond any healthy
  run measured here (1e-5 to 1e-1); AUTOTRAINER uses a loss of 1e5 as its absolute anchor.
* ``jump_factor = 1e3`` over the median of the tensor's last ``window`` observations (after
  ``min_history``): a sudden blow-up relative to the tensor's own history, well above the 10-100×
  swings of loss spikes in healthy runs.
* ``patience = 3`` observations for vanishing: a single tiny gradient is noise, three in a row is not.

Biases and other 1-D tensors that belong to a layer with a weight are judged through that weight:
a conv bias right before BatchNorm has a true gradient of zero and is not "vanishing". A tensor
whose gradient is exactly zero from its first observation is structurally zero and exempt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch.report import GradientEvent

__all__ = [
    "SKIPPED_STEPS_EVENT",
    "HealthMonitor",
    "HealthThresholds",
    "layer_prefix",
    "skipped_steps_event",
]

#: Consecutive optimizer steps a loss scaler skipped before the collapsing scale is an event.
SKIPPED_STEPS_EVENT = 10


@dataclass(frozen=True)
class HealthThresholds:
    """Thresholds of the health rules (see the module docstring for each default's reason).

    Example:
        >>> HealthThresholds(patience=5).patience
        5
    """

    vanish_threshold: float = 1e-7
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


def layer_prefix(name: str) -> str:
    """The layer part of a parameter name: ``"fc1.bias"`` → ``"fc1"``, ``"seq/dense/bias"`` → ``"seq/dense"``.

    Example:
        >>> layer_prefix("net.0.weight"), layer_prefix("model/dense_1/kernel"), layer_prefix("w")
        ('net.0', 'model/dense_1', '')
    """
    cut = max(name.rfind("."), name.rfind("/"))
    return name[:cut] if cut > 0 else ""


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
        weights = [n for n, s in shapes.items() if len(s) >= 2]
        weight_layers = {layer_prefix(n) for n in weights}
        self.weights = set(weights)
        self.followers = {
            n
            for n, s in shapes.items()
            if len(s) < 2 and layer_prefix(n) in weight_layers and layer_prefix(n) != ""
        }
        self.reference = weights[-1] if weights else None
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
        self._is_weight = np.array([x in self.weights for x in self.order], dtype=bool)
        self._judged = np.array([x not in self.followers for x in self.order], dtype=bool)
        self._not_ref = np.array([x != self.reference for x in self.order], dtype=bool)
        self._ref_index = self.order.index(self.reference) if self.reference is not None else -1
        self._fast_ready = n > 0
        self._all_rows = np.arange(n)
        self._structural_cache: (
            tuple[frozenset[str], tuple[np.ndarray, np.ndarray, np.ndarray | None]] | None
        ) = None

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
    def _vanishing(self, name: str, rms: float, ref: float | None) -> float | None:
        """Threshold crossed when ``name`` is vanishing now, else ``None``."""
        th = self.thresholds
        if name in self.followers or name in self._structural:
            return None
        if rms < th.vanish_threshold:
            return th.vanish_threshold
        if (
            name in self.weights
            and name != self.reference
            and ref is not None
            and ref > 0
            and rms < th.vanish_ceiling
            and rms < th.vanish_ratio * ref
        ):
            return th.vanish_ratio * ref
        return None

    def _exploding(self, name: str, rms: float) -> float | None:
        th = self.thresholds
        if rms > th.explode_threshold:
            return th.explode_threshold
        hist = self._history(name)
        if len(hist) >= th.min_history:
            med = float(np.median(hist))
            if med > 0 and rms > th.jump_factor * med:
                return th.jump_factor * med
        return None

    # -- episodes --------------------------------------------------------------------------
    def _episode(self, key: str, on: bool, patience: int) -> bool:
        """Advance one condition; True exactly when an episode starts now."""
        if not on:
            self._count.pop(key, None)
            self._active.discard(key)
            return False
        self._count[key] = self._count.get(key, 0) + 1
        if key not in self._active and self._count[key] >= patience:
            self._active.add(key)
            return True
        return False

    def _masks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Row indices the fast path reduces over: judged rows, ratio-judged weights, structural."""
        key = frozenset(self._structural)
        if self._structural_cache is None or self._structural_cache[0] != key:
            structural = np.array([n in key for n in self.order], dtype=bool)
            judged = self._judged & ~structural
            weights = judged & self._is_weight & self._not_ref
            self._structural_cache = (
                key,
                (
                    np.nonzero(judged)[0],
                    np.nonzero(weights)[0],
                    np.nonzero(structural)[0] if key else None,
                ),
            )
        return self._structural_cache[1]

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
        judged, weights, structural = self._masks()
        if judged.size and block[:, judged].min() < th.vanish_threshold:
            return False
        if self._ref_index >= 0 and weights.size:
            ref = block[:, self._ref_index]
            limit = np.minimum(th.vanish_ceiling, th.vanish_ratio * ref)
            if np.any((ref > 0) & (block[:, weights].min(axis=1) < limit)):
                return False
        if structural is not None and np.any(block[:, structural] != 0.0):
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
        th = self.thresholds
        events: list[GradientEvent] = []
        bad = [n for n, v in rms.items() if not math.isfinite(v)]
        if self._episode("nonfinite:global", bool(bad), 1):
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            events.append(
                GradientEvent(
                    step=step,
                    kind="nonfinite",
                    param="global",
                    value=float(len(bad)),
                    threshold=0.0,
                    message=(
                        f"gradients of {len(bad)} tensor(s) are NaN or inf ({shown}): lower the "
                        f"learning rate, guard the loss against log(0) or division by zero, or clip "
                        f"gradients"
                    ),
                )
            )
        ref = rms.get(self.reference) if self.reference is not None else None
        if ref is not None and not math.isfinite(ref):
            ref = None
        for name, value in rms.items():
            if not math.isfinite(value):
                continue
            if name not in self._seen:
                self._seen.add(name)
                if value == 0.0:
                    self._structural.add(name)
            elif name in self._structural and value != 0.0:
                self._structural.discard(name)
            crossed = self._vanishing(name, value, ref)
            if self._episode(f"vanishing:{name}", crossed is not None, th.patience):
                assert crossed is not None
                rel = (
                    f", {value / ref:.2g}× that of {self.reference},"
                    if ref and name != self.reference
                    else ""
                )
                events.append(
                    GradientEvent(
                        step=step,
                        kind="vanishing",
                        param=name,
                        value=value,
                        threshold=crossed,
                        message=(
                            f"the gradient of {name} has RMS {value:.3g}{rel} below {crossed:.3g} for "
                            f"{th.patience} observations, so it barely learns: try a ReLU-family "
                            f"activation, normalisation, residual connections or another initialisation"
                        ),
                    )
                )
            crossed = self._exploding(name, value)
            if self._episode(f"exploding:{name}", crossed is not None, 1):
                assert crossed is not None
                events.append(
                    GradientEvent(
                        step=step,
                        kind="exploding",
                        param=name,
                        value=value,
                        threshold=crossed,
                        message=(
                            f"the gradient of {name} has RMS {value:.3g}, above {crossed:.3g}: lower "
                            f"the learning rate, clip gradients or check the initialisation"
                        ),
                    )
                )
            i = self._row(name)
            self._push(np.array([i]), np.array([value]))
        return events

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (patience counters, open episodes, recent history)."""
        return {
            "history": {k: self._history(k).tolist() for k in self._index},
            "count": dict(self._count),
            "active": sorted(self._active),
            "structural": sorted(self._structural),
            "seen": sorted(self._seen),
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
        self._seen = set(state.get("seen", ()))
