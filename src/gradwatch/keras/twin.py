"""The float64 evaluation of a Keras model: the model itself, computing in float64 for one call.

No clone and no serialization (which silently fell back to float32 for subclassed models, layers
without ``get_config`` and function or lambda losses). For the duration of one evaluation
(:meth:`Float64Evaluation.active`, ``try/finally``):

- every float layer's dtype policy is ``float64`` (inputs are cast to it, constants made in it);
- the variables' values are the float64 values given, written into a ``keras.StatelessScope``
  with ``add_update`` (the scope's ``state_mapping`` would cast them back to the variables' own
  dtype), and read under a float64 autocast scope (``variable.dtype`` says float64 too);
- the loss is a float64 ``CompileLoss`` in place of ``model._compile_loss``, so a custom
  ``compute_loss`` still runs and calls it; ``floatx()`` is float64, and loss objects the model
  or a ``loss_fn`` holds compute in float64 too;
- on the torch and JAX backends Keras' result-type rules keep float64 (``_compat``).

Afterwards every variable, policy, the compiled loss and ``floatx`` are as before: assignments
made during the evaluation (BatchNorm statistics, seed state, metrics) went into the scope and
are discarded.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras

from gradwatch.keras import _compat

__all__ = ["Float64Evaluation", "compiled_loss", "loss_in", "model_dtype", "scope_name"]


def scope_name(name: str) -> str:
    """A name TensorFlow accepts as a name scope (``"<lambda>"`` is not one).

    Example:
        >>> scope_name("<lambda>")
        'lambda'
    """
    clean = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_")
    if not clean or not re.match(r"[A-Za-z0-9.]", clean[0]):
        clean = f"loss_{clean}".rstrip("_")
    return clean


class _FunctionLoss(keras.losses.Loss):  # type: ignore[misc]
    """A loss function as a ``Loss`` object with an explicit dtype (inputs are cast to it)."""

    def __init__(self, fn: Callable[..., Any], dtype: str, reduction: str | None = "none") -> None:
        name = getattr(fn, "__name__", None) or type(fn).__name__
        super().__init__(name=scope_name(str(name)), dtype=dtype, reduction=reduction)
        self.fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.fn(y_true, y_pred)


class _Reduced(keras.losses.Loss):  # type: ignore[misc]
    """Reduces an unreduced loss itself, in its dtype (a plain division: no ``divide_no_nan``)."""

    def __init__(self, inner: keras.losses.Loss, reduction: str | None, dtype: str) -> None:
        super().__init__(name=scope_name(inner.name), dtype=dtype, reduction=None)
        self.inner = inner
        self.mode = reduction or "none"

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        values = self.inner(y_true, y_pred, sample_weight)
        if self.mode == "none" or len(values.shape) == 0:
            return values
        total = keras.ops.sum(values)
        if self.mode == "sum":
            return total
        if self.mode == "mean_with_sample_weight" and sample_weight is not None:
            weights = keras.ops.cast(keras.ops.sum(sample_weight), total.dtype)
            return total / weights
        return total / float(max(1, math.prod(int(d) for d in values.shape)))


def loss_in(loss: Any, dtype: str) -> Any:
    """The same loss (structure kept) as explicit objects computing in ``dtype``.

    Strings, ``Loss`` objects, plain functions and lambdas; a ``Loss`` that cannot be rebuilt
    from its config is wrapped as it is.
    """
    if loss is None:
        return None
    if isinstance(loss, Mapping):
        return {k: loss_in(x, dtype) for k, x in loss.items()}
    if isinstance(loss, (list, tuple)):
        return type(loss)(loss_in(x, dtype) for x in loss)
    obj = keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(obj, keras.losses.Loss):
        config = obj.get_config()
        reduction = config.get("reduction", "sum_over_batch_size")
        config.update(dtype=dtype, reduction="none")
        try:
            inner = obj.__class__.from_config(config)
        except Exception:
            return _Reduced(_FunctionLoss(obj, dtype, reduction=None), "none", dtype)
        return _Reduced(inner, reduction, dtype)
    if callable(obj):
        return _Reduced(_FunctionLoss(obj, dtype), "sum_over_batch_size", dtype)
    raise ValueError(f"loss must be anything model.compile(loss=...) accepts, got {loss!r}")


def compiled_loss(model: Any) -> Any:
    return getattr(model, "loss", None)


def model_dtype(model: Any) -> str:
    for w in model.trainable_weights:
        return str(w.dtype)
    return str(keras.config.floatx())


class Float64Evaluation:
    """Evaluations of ``model`` itself in ``dtype``, reversibly.

    Args:
        model: A built Keras model.
        loss: The loss to put in place of the compiled one (anything ``compile(loss=...)``
            takes), or ``None`` when the caller computes the loss itself (``loss_fn``).
        dtype: ``"float64"`` or ``"float32"``.
    """

    def __init__(self, model: Any, loss: Any, dtype: str) -> None:
        self.model = model
        self.dtype = dtype
        self.compile_loss: Any = None
        if loss is not None:
            weights = _compat.compile_loss_weights(model)
            with _floatx(dtype):  # CompileLoss takes its dtype from floatx when it is created
                self.compile_loss = _compat.compile_loss(
                    loss_in(loss, dtype), weights, _compat.compile_output_names(model)
                )
        self.policy = keras.dtype_policies.DTypePolicy(dtype)

    def _float_layers(self) -> list[Any]:
        out = []
        for layer in _compat.layers_of(self.model):
            policy = getattr(layer, "dtype_policy", None)
            if policy is None or getattr(policy, "quantization_mode", None):
                continue  # quantized layers keep their policy (their kernels are integers)
            if "float" in str(layer.compute_dtype):
                out.append(layer)
        return out

    @contextlib.contextmanager
    def active(self, values: Sequence[tuple[Any, Any]]) -> Iterator[Any]:
        """Inside: the model computes in ``dtype`` with ``values`` (variable, tensor) in place."""
        swapped: list[tuple[Any, Any]] = []
        loss_swapped = False
        saved_loss: Any = None
        backend = keras.backend.backend()
        with contextlib.ExitStack() as stack:
            try:
                for layer in self._float_layers():
                    swapped.append((layer, _compat.swap_dtype_policy(layer, self.policy)))
                if self.compile_loss is not None:
                    saved_loss = _compat.swap_compile_loss(self.model, self.compile_loss)
                    loss_swapped = True
                stack.enter_context(_floatx(self.dtype))
                stack.enter_context(_compat.loss_objects_in(self.dtype))
                if self.dtype == "float64" and backend != "tensorflow":
                    stack.enter_context(_compat.float64_result_types())
                scope = stack.enter_context(keras.StatelessScope())
                for variable, value in values:
                    scope.add_update((variable, value))  # add_update does not cast
                stack.enter_context(_compat.autocast_scope(self.dtype))
                yield scope
            finally:
                stack.close()
                if loss_swapped:
                    _compat.swap_compile_loss(self.model, saved_loss)
                for layer, policy in reversed(swapped):
                    _compat.swap_dtype_policy(layer, policy)


@contextlib.contextmanager
def _floatx(dtype: str) -> Iterator[None]:
    saved = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(saved)
