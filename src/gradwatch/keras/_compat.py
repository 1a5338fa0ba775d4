"""Private Keras attributes gradwatch relies on, in one place.

Each is read from Keras 3.5-3.15 (the range ``pyproject.toml`` allows); ``tests/keras/test_compat.py``
fails loudly if one disappears, instead of gradwatch going silently wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = [
    "autocast_scope",
    "compile_loss",
    "compile_loss_weights",
    "compile_output_names",
    "float64_result_types",
    "layers_of",
    "loss_objects_in",
    "optimizer_variables",
    "swap_compile_loss",
    "swap_dtype_policy",
]


def optimizer_variables(optimizer: Any) -> list[Any]:
    """The variables an optimizer was built for, in the order ``apply`` receives gradients.

    ``BaseOptimizer._trainable_variables`` (Keras 3.5-3.15): ``apply(grads)`` without variables
    pairs the gradients with this list.
    """
    return list(optimizer._trainable_variables)


@contextlib.contextmanager
def float64_result_types() -> Iterator[None]:
    """Keras' result-type rules keep float64 as float64 while this is active.

    ``BIT64_TO_BIT32_DTYPE["float64"]`` in ``keras/src/backend/common/dtypes.py`` (Keras 3.0-3.15)
    is ``"float32"`` on every backend but TensorFlow, so ``ops.matmul``/``divide_no_nan``/``var``
    of float64 operands come out float32 on the torch and JAX backends. The table is read at each
    call (after the cached lattice steps), so mapping the entry to ``"float64"`` for the duration
    of a check and putting it back (``try/finally``) is enough.
    """
    from keras.src.backend.common import dtypes

    table = dtypes.BIT64_TO_BIT32_DTYPE
    saved = table["float64"]
    table["float64"] = "float64"
    try:
        yield
    finally:
        table["float64"] = saved


@contextlib.contextmanager
def loss_objects_in(dtype: str) -> Iterator[None]:
    """Every float ``keras.losses.Loss`` object computes in ``dtype`` while this is active.

    ``Loss.dtype`` (Keras 3.0-3.15) is fixed from ``floatx()`` when the object is created, and
    ``Loss.__call__`` casts ``y_true``/``y_pred`` to it: a loss object held by the model (or a
    closure) and called from ``train_step``/``loss_fn`` would round a float64 evaluation to
    float32. The class property is replaced for the duration and put back (``try/finally``).
    """
    import keras

    cls = keras.losses.Loss
    saved = cls.__dict__["dtype"]

    def widened(self: Any) -> Any:
        own = saved.fget(self)
        return dtype if own is not None and "float" in str(own) else own

    cls.dtype = property(widened)
    try:
        yield
    finally:
        cls.dtype = saved


def layers_of(model: Any) -> list[Any]:
    """The model and every layer inside it, nested ones too (``Layer._flatten_layers``)."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def swap_dtype_policy(layer: Any, policy: Any) -> Any:
    """Set ``layer``'s dtype policy without the setter's bookkeeping; return the old one.

    ``Layer._dtype_policy`` (Keras 3.0-3.15) is what ``compute_dtype``/``variable_dtype`` read; the
    public setter also rewrites a ``DTypePolicyMap`` entry, which a reversible swap must not do.
    """
    old = layer._dtype_policy
    layer._dtype_policy = policy
    return old


def compile_loss(loss: Any, loss_weights: Any, output_names: Any) -> Any:
    """A ``CompileLoss`` (``keras/src/trainers/compile_utils.py``), as ``Model.compile`` builds one;
    its dtype is ``floatx()`` at construction."""
    from keras.src.trainers.compile_utils import CompileLoss

    return CompileLoss(loss, loss_weights, output_names=output_names)


def swap_compile_loss(model: Any, value: Any) -> Any:
    """Put ``value`` in ``Trainer._compile_loss`` (what ``compute_loss`` calls); return the old."""
    old = getattr(model, "_compile_loss", None)
    model._compile_loss = value
    return old


def compile_output_names(model: Any) -> Any:
    """The output names the model's own ``CompileLoss`` was built with (``None`` if none)."""
    own = getattr(model, "_compile_loss", None)
    if own is not None and getattr(own, "output_names", None) is not None:
        return own.output_names
    return getattr(model, "output_names", None)


def compile_loss_weights(model: Any) -> Any:
    """The ``loss_weights`` given to ``compile`` (``CompileLoss._user_loss_weights``); read there
    rather than from ``get_compile_config()``, which serializes the loss (and warns about a
    lambda)."""
    own = getattr(model, "_compile_loss", None)
    return getattr(own, "_user_loss_weights", None) if own is not None else None


def autocast_scope(dtype: str) -> Any:
    """``keras.src.backend.AutocastScope``: float variables read as ``dtype`` inside it, and
    ``variable.dtype`` says so (code that casts to ``self.kernel.dtype`` stays in ``dtype``)."""
    from keras.src.backend import AutocastScope

    return AutocastScope(dtype)
