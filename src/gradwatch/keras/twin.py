"""The float64 twin of a Keras model: layers cloned in float64, the loss rebuilt as float64 objects."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import keras

__all__ = ["build_twin", "compiled_loss", "loss_in", "model_dtype"]


def _retype(layer: Any, dtype: str) -> Any:
    config = layer.get_config()
    if "dtype" not in config:
        return layer.__class__.from_config(config)
    config["dtype"] = dtype
    return layer.__class__.from_config(config)


class _FunctionLoss(keras.losses.Loss):  # type: ignore[misc]
    """A loss function as a ``Loss`` object with an explicit dtype (inputs are cast to it)."""

    def __init__(self, fn: Callable[..., Any], dtype: str, reduction: str | None = "none") -> None:
        super().__init__(name=getattr(fn, "__name__", "loss"), dtype=dtype, reduction=reduction)
        self.fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.fn(y_true, y_pred)


class _Reduced(keras.losses.Loss):  # type: ignore[misc]
    """Reduces an unreduced loss itself, in its dtype.

    Keras 3.15 reduces ``sum_over_batch_size`` with ``ops.divide_no_nan``, which returns float32
    for float64 inputs on the torch backend; a plain division keeps float64 everywhere.
    """

    def __init__(self, inner: keras.losses.Loss, reduction: str | None, dtype: str) -> None:
        super().__init__(name=inner.name, dtype=dtype, reduction=None)
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
    """The same loss (structure kept) as explicit objects computing in ``dtype``."""
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


def build_twin(model: Any, loss: Any, dtype: str) -> tuple[Any, list[str]]:
    """A clone of ``model`` in ``dtype`` compiled with ``loss`` in ``dtype``; or the model itself."""
    notes: list[str] = []
    twin = model
    if dtype != model_dtype(model):
        try:
            twin = keras.models.clone_model(
                model, clone_function=lambda layer: _retype(layer, dtype)
            )
            if not twin.built:
                twin.build(model.input_shape if hasattr(model, "input_shape") else None)
            if len(twin.weights) != len(model.weights):
                raise ValueError("the clone has different weights")
        except Exception as exc:
            twin = model
            note = (
                f"the model could not be cloned in {dtype} ({type(exc).__name__}: {exc}); checked "
                f"in {model_dtype(model)} instead, where bugs smaller than about 40% of a "
                f"gradient are invisible"
            )
            notes.append(note)
            warnings.warn(f"gradwatch: {note}", UserWarning, stacklevel=4)
    if twin is not model:
        compile_config = model.get_compile_config() if model.compiled else {}
        weights = (compile_config or {}).get("loss_weights")
        # CompileLoss takes its dtype from floatx when it is created: create it under `dtype`,
        # or it casts y_pred back to float32 and every quotient comes out quantised.
        floatx = keras.config.floatx()
        try:
            keras.config.set_floatx(dtype)
            twin.compile(loss=loss_in(loss, dtype), loss_weights=weights)
        finally:
            keras.config.set_floatx(floatx)
    return twin, notes


def model_dtype(model: Any) -> str:
    for w in model.trainable_weights:
        return str(w.dtype)
    return str(keras.config.floatx())
