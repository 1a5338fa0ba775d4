"""One Keras layer call checked alone (TensorFlow backend): ``<cotangent, layer(inputs; weights)>``.

A localization (:mod:`gradwatch.keras.localize`) records, in one float64 forward/backward of the
model, each layer call's inputs, the values of the layer's non-trainable state at the call
(BatchNorm statistics, dropout seed state) and the cotangent its outputs received.
:class:`LayerProblem` presents that call to the check engine as a scalar function of

- each floating input that carried a gradient in training (one slot per input tensor),
- each of the layer's own trainable weights (one slot each), and
- the trainable weights of its sublayers, as one flat slot (a parent may use them directly);

every evaluation is the layer's ``__call__`` in training mode inside the model's float64
evaluation (:class:`~gradwatch.keras.twin.Float64Evaluation`, a ``StatelessScope``), with the
recorded state in place, so dropout draws the mask it drew in training and nothing the layer
assigns survives the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from gradwatch.core.problem import Perturbation
from gradwatch.localization import INNER_SLOTS

__all__ = ["INNER", "LayerCall", "LayerProblem", "float_outputs", "is_float_tensor"]

#: The name of the slot holding the trainable weights of a layer's sublayers.
INNER = INNER_SLOTS[1]


def is_float_tensor(x: Any) -> bool:
    """Whether ``x`` is a floating TensorFlow tensor.

    Example:
        >>> is_float_tensor(tf.ones(2)), is_float_tensor(tf.ones(2, "int32")), is_float_tensor(2.0)
        (True, False, False)
    """
    return bool(tf.is_tensor(x) and x.dtype.is_floating)


def float_outputs(out: Any) -> list[Any]:
    """The floating tensors of a layer's output, in ``tf.nest.flatten`` order.

    Example:
        >>> len(float_outputs({"a": tf.ones(1), "b": tf.ones(1, "int32")}))
        1
    """
    return [t for t in tf.nest.flatten(out) if is_float_tensor(t)]


@dataclass
class LayerCall:
    """One recorded call of a layer during the recording pass.

    Attributes:
        name: The layer's name in the model (dotted, ``block.act``; the model is ``<model>``).
        layer: The layer.
        args: Positional inputs as ``call`` received them.
        kwargs: Keyword inputs (``training``, ``mask``) as ``call`` received them.
        state: ``(variable, value)`` of the layer's non-trainable variables at the call.
        outputs: The floating output tensors, in ``tf.nest.flatten`` order.
        needs_grad: Per input leaf (``tf.nest.flatten`` order of ``(args, kwargs)``): floating
            and carrying a gradient in training (filled after the backward pass).
        cotangents: The cotangent each output received (``None``: it did not reach the loss).
    """

    name: str
    layer: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: list[tuple[Any, Any]]
    outputs: list[Any] = field(default_factory=list)
    needs_grad: list[bool] = field(default_factory=list)
    cotangents: list[Any] = field(default_factory=list)

    @property
    def leaves(self) -> list[Any]:
        """The flattened ``(args, kwargs)``."""
        return list(tf.nest.flatten((self.args, self.kwargs)))


class LayerProblem:
    """A layer call as the check engine's ``Problem`` (see the module docstring).

    Args:
        call: The recorded call (with cotangents and ``needs_grad``).
        own: The layer's own trainable float weights ``(name, variable)``.
        inner: Its sublayers' trainable float weights.
        base: ``(variable, float64 value)`` of every model variable, as in the recording pass.
        active: ``active(mapping)``: the model's float64 evaluation context.
    """

    def __init__(
        self,
        call: LayerCall,
        own: Sequence[tuple[str, Any]],
        inner: Sequence[Any],
        base: Sequence[tuple[Any, Any]],
        active: Callable[[list[tuple[Any, Any]]], Any],
    ) -> None:
        self.call = call
        self.own = list(own)
        self.inner = list(inner)
        self.active = active
        self._base_values = {id(v): (v, x) for v, x in base}
        for v, x in call.state:
            self._base_values[id(v)] = (v, x)
        self.inputs = call.leaves
        self.input_slots = [k for k, need in enumerate(call.needs_grad) if need]
        names = ["input" if len(self.input_slots) == 1 else f"input[{k}]" for k in self.input_slots]
        names += [n for n, _ in self.own] + ([INNER] if self.inner else [])
        self._names = names
        self._values = [self._slot_value(k) for k in range(len(names))]
        self._base = float("nan")
        self._grads: list[npt.NDArray[np.float64] | None] = []
        self.evaluations = 0

    # -- Problem protocol ----------------------------------------------------------------------
    @property
    def names(self) -> Sequence[str]:
        return self._names

    @property
    def shapes(self) -> Sequence[tuple[int, ...]]:
        return [tuple(v.shape) for v in self._values]

    @property
    def dtype(self) -> np.dtype[np.floating[Any]]:
        return np.dtype(np.float64)

    @property
    def base_loss(self) -> float:
        return self._base

    def values(self, tensor: int) -> npt.NDArray[np.floating[Any]]:
        return self._values[tensor].copy()

    def gradient(self, tensor: int) -> npt.NDArray[np.floating[Any]] | None:
        return self._grads[tensor]

    def losses(self, perturbations: Sequence[Perturbation]) -> npt.NDArray[np.float64]:
        out = np.empty(len(perturbations), dtype=np.float64)
        for k, pert in enumerate(perturbations):
            if pert.index is not None:
                raise ValueError("a local check perturbs along directions only")
            slots = self._tensors()
            slots[pert.tensor] = tf.constant(np.asarray(pert.value, dtype=np.float64))
            out[k] = float(self._evaluate(slots).numpy())
        return out

    # -- slots ---------------------------------------------------------------------------------
    def _slot_value(self, slot: int) -> npt.NDArray[np.float64]:
        n_in, n_own = len(self.input_slots), len(self.own)
        if slot < n_in:
            return np.asarray(self.inputs[self.input_slots[slot]].numpy(), dtype=np.float64)
        if slot < n_in + n_own:
            return self._weight(self.own[slot - n_in][1])
        return np.concatenate([self._weight(w).ravel() for w in self.inner])

    def _weight(self, variable: Any) -> npt.NDArray[np.float64]:
        return np.asarray(self._base_values[id(variable)][1].numpy(), dtype=np.float64)

    def _tensors(self) -> list[Any]:
        return [tf.constant(v) for v in self._values]

    # -- evaluation ----------------------------------------------------------------------------
    def compute_base(self) -> None:
        """``f`` at the recorded point and its autodiff gradient along every slot."""
        slots = self._tensors()
        with tf.GradientTape() as tape:
            for t in slots:
                tape.watch(t)
            f = self._evaluate(slots)
        grads = tape.gradient(f, slots, unconnected_gradients=tf.UnconnectedGradients.NONE)
        self._base = float(f.numpy())
        self._grads = [None if g is None else np.asarray(tf.convert_to_tensor(g)) for g in grads]

    def _evaluate(self, slots: list[Any]) -> Any:
        """``<cotangent, layer(inputs; weights)>`` with the slots' values in place."""
        self.evaluations += 1
        n_in, n_own = len(self.input_slots), len(self.own)
        leaves = list(self.inputs)
        for k, index in enumerate(self.input_slots):
            leaves[index] = slots[k]
        values = dict(self._base_values)
        for k, (_, w) in enumerate(self.own):
            values[id(w)] = (w, slots[n_in + k])
        if self.inner:
            flat, offset = slots[n_in + n_own], 0
            for w in self.inner:
                size = int(np.prod(w.shape))
                values[id(w)] = (w, tf.reshape(flat[offset : offset + size], w.shape))
                offset += size
        args, kwargs = tf.nest.pack_sequence_as((self.call.args, self.call.kwargs), leaves)
        kwargs = dict(kwargs)
        kwargs.setdefault("training", True)  # Keras drops it for a call() without `training`
        with self.active(list(values.values())):
            out = self.call.layer(*args, **kwargs)
        return self._dot(out)

    def _dot(self, out: Any) -> Any:
        outputs = float_outputs(out)
        total = None
        for t, cot in zip(outputs, self.call.cotangents, strict=False):
            if cot is None or tuple(cot.shape) != tuple(t.shape):
                continue
            term = tf.reduce_sum(tf.cast(t, tf.float64) * tf.cast(cot, tf.float64))
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no output of the call received a cotangent")
        return total
