"""One Keras layer call checked alone, on any backend: ``<cotangent, layer(inputs; weights)>``.

A localization (:mod:`gradwatch.keras.localize`) records, in one forward/backward of the model,
each layer call's inputs, the values of the layer's non-trainable state at the call (BatchNorm
statistics, dropout seed state; on the torch backend also torch's RNG state, which Keras' unseeded
dropout draws from) and the cotangent its outputs received. :class:`LayerProblem` presents that
call to the check engine as a scalar function of

- each floating input that carried a gradient in training (one slot per input tensor),
- each of the layer's own trainable weights (one slot each), and
- the trainable weights of its sublayers, as one flat slot (a parent may use them directly);

every evaluation is the layer's ``__call__`` in training mode inside the model's float64
evaluation (:class:`~gradwatch.keras.twin.Float64Evaluation`, a ``StatelessScope``), with the
recorded state in place, so dropout draws the mask it drew in training and nothing the layer
assigns survives the evaluation. Gradients come from the backend's own autodiff
(:func:`gradwatch.keras.backend.value_and_grad`: ``tf.GradientTape``, ``torch.autograd.grad``,
``jax.value_and_grad``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from gradwatch.core.problem import Perturbation
from gradwatch.keras.backend import to_numpy, value_and_grad
from gradwatch.localization import INNER_SLOTS

__all__ = ["INNER", "LayerCall", "LayerProblem", "float_outputs", "is_float_tensor", "keras_logits"]

#: The name of the slot holding the trainable weights of a layer's sublayers.
INNER = INNER_SLOTS[1]


def is_float_tensor(x: Any) -> bool:
    """Whether ``x`` is a floating tensor of the backend (a numpy array or a number is not).

    Example:
        >>> ops = keras.ops
        >>> is_float_tensor(ops.ones(2)), is_float_tensor(ops.ones(2, "int32")), is_float_tensor(2.0)
        (True, False, False)
    """
    if not keras.ops.is_tensor(x):
        return False
    return "float" in keras.backend.standardize_dtype(x.dtype)


def float_outputs(out: Any) -> list[Any]:
    """The floating tensors of a layer's output, in ``keras.tree.flatten`` order.

    Example:
        >>> len(float_outputs({"a": keras.ops.ones(1), "b": keras.ops.ones(1, "int32")}))
        1
    """
    return [t for t in keras.tree.flatten(out) if is_float_tensor(t)]


def keras_logits(t: Any) -> Any:
    """The logits Keras attached to a softmax/sigmoid output (``output._keras_logits``), or ``None``.

    On TensorFlow, ``categorical_crossentropy``, ``sparse_categorical_crossentropy`` and
    ``binary_crossentropy`` (``from_logits=False``) compute the loss from ``output._keras_logits``
    when it is there (``keras/src/backend/tensorflow/nn.py``, ``_get_logits``): the loss flows
    through the logits, not the output, so the output of the layer ending in that activation gets
    no cotangent. The torch and JAX backends' losses never read it.

    Example:
        >>> keras_logits(keras.activations.softmax(keras.ops.ones((1, 2)))) is not None
        True
    """
    logits = getattr(t, "_keras_logits", None)
    return logits if is_float_tensor(logits) else None


@dataclass
class LayerCall:
    """One recorded call of a layer during the recording pass.

    Attributes:
        name: The layer's name in the model (dotted, ``block.act``; the model is ``<model>``).
        layer: The layer.
        args: Positional inputs as ``call`` received them.
        kwargs: Keyword inputs (``training``, ``mask``) as ``call`` received them.
        state: ``(variable, value)`` of the layer's non-trainable variables at the call.
        outputs: The floating output tensors, in ``keras.tree.flatten`` order.
        needs_grad: Per input leaf (``keras.tree.flatten`` order of ``(args, kwargs)``): floating
            and carrying a gradient in training (filled after the backward pass).
        cotangents: The cotangent each output received (``None``: it did not reach the loss).
        logit_cotangents: Per output, the cotangent its :func:`keras_logits` received where the
            output itself received none (``None`` otherwise; empty off TensorFlow).
        rng: torch's CPU RNG state at the call (torch backend; ``None`` elsewhere).
    """

    name: str
    layer: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: list[tuple[Any, Any]]
    outputs: list[Any] = field(default_factory=list)
    needs_grad: list[bool] = field(default_factory=list)
    cotangents: list[Any] = field(default_factory=list)
    logit_cotangents: list[Any] = field(default_factory=list)
    rng: Any = None

    @property
    def leaves(self) -> list[Any]:
        """The flattened ``(args, kwargs)``."""
        return list(keras.tree.flatten((self.args, self.kwargs)))


@contextlib.contextmanager
def _rng_at(state: Any) -> Iterator[None]:
    """torch's CPU RNG set to ``state`` inside, the caller's stream restored after."""
    if state is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        yield


class LayerProblem:
    """A layer call as the check engine's ``Problem`` (see the module docstring).

    Args:
        call: The recorded call (with cotangents and ``needs_grad``).
        own: The layer's own trainable float weights ``(name, variable)``.
        inner: Its sublayers' trainable float weights.
        base: ``(variable, value)`` of the model variables the evaluation sets (the whole
            model's float64 values, or, layer by layer, only this layer's); the recorded state
            is added.
        active: ``active(mapping)``: the model's float64 evaluation context.
        dtype: The precision the evaluations compute in: ``"float64"``, or ``"float32"`` where
            the backend has no float64 (JAX without ``JAX_ENABLE_X64=1``).
    """

    def __init__(
        self,
        call: LayerCall,
        own: Sequence[tuple[str, Any]],
        inner: Sequence[Any],
        base: Sequence[tuple[Any, Any]],
        active: Callable[[list[tuple[Any, Any]]], Any],
        dtype: str = "float64",
    ) -> None:
        self.call = call
        self.own = list(own)
        self.inner = list(inner)
        self.active = active
        self.precision = dtype
        self._base_values = {id(v): (v, x) for v, x in base}
        for v, x in call.state:  # recorded in the model's dtype when checked layer by layer
            self._base_values[id(v)] = (v, keras.ops.cast(x, dtype) if is_float_tensor(x) else x)
        # Recorded in the model's dtype (layer by layer) or already in `dtype`: widen the floats.
        self.inputs = [keras.ops.cast(x, dtype) if is_float_tensor(x) else x for x in call.leaves]
        self.input_slots = [k for k, need in enumerate(call.needs_grad) if need]
        names = ["input" if len(self.input_slots) == 1 else f"input[{k}]" for k in self.input_slots]
        names += [n for n, _ in self.own] + ([INNER] if self.inner else [])
        self._names = names
        self._values = [self._slot_value(k) for k in range(len(names))]
        self._base = float("nan")
        self._grads: list[npt.NDArray[Any] | None] = []
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
        return np.dtype(self.precision)

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
            slots[pert.tensor] = self._tensor(np.asarray(pert.value))
            out[k] = float(to_numpy(self._evaluate(slots)))
        return out

    # -- slots ---------------------------------------------------------------------------------
    def _slot_value(self, slot: int) -> npt.NDArray[Any]:
        n_in, n_own = len(self.input_slots), len(self.own)
        if slot < n_in:
            return np.asarray(to_numpy(self.inputs[self.input_slots[slot]]), self.precision)
        if slot < n_in + n_own:
            return self._weight(self.own[slot - n_in][1])
        return np.concatenate([self._weight(w).ravel() for w in self.inner])

    def _weight(self, variable: Any) -> npt.NDArray[Any]:
        return np.asarray(to_numpy(self._base_values[id(variable)][1]), self.precision)

    def _tensor(self, value: npt.NDArray[Any]) -> Any:
        return keras.ops.convert_to_tensor(value.astype(self.precision), dtype=self.precision)

    def _tensors(self) -> list[Any]:
        return [self._tensor(v) for v in self._values]

    # -- evaluation ----------------------------------------------------------------------------
    def compute_base(self) -> None:
        """``f`` at the recorded point and its autodiff gradient along every slot."""
        self._base, self._grads = value_and_grad(self._evaluate, self._tensors())

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
                part = keras.ops.reshape(flat[offset : offset + size], tuple(w.shape))
                values[id(w)] = (w, part)
                offset += size
        args, kwargs = keras.tree.pack_sequence_as((self.call.args, self.call.kwargs), leaves)
        kwargs = dict(kwargs)
        kwargs.setdefault("training", True)  # Keras drops it for a call() without `training`
        with _rng_at(self.call.rng), self.active(list(values.values())):
            out = self.call.layer(*args, **kwargs)
        return self._dot(out)

    def _dot(self, out: Any) -> Any:
        """``<cotangent, output>`` summed over the outputs; for an output that reached the loss
        only through its Keras logits (a softmax/sigmoid head on TensorFlow), ``<cotangent,
        output._keras_logits>`` instead — the re-evaluated output carries them again."""
        ops = keras.ops
        total = None
        outputs = float_outputs(out)
        logit_cots = self.call.logit_cotangents or [None] * len(outputs)
        for t, cot, logit_cot in zip(outputs, self.call.cotangents, logit_cots, strict=False):
            if cot is None and logit_cot is not None:
                t, cot = keras_logits(t), logit_cot
                if t is None:
                    raise ValueError("the re-run output carries no Keras logits (_keras_logits)")
            if cot is None or tuple(cot.shape) != tuple(t.shape):
                continue
            term = ops.sum(ops.cast(t, self.precision) * ops.cast(cot, self.precision))
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no output of the call received a cotangent")
        return total
