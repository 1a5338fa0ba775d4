"""Keras 3 adapter: ``check_gradients`` / ``assert_gradients``, ``localize`` and the ``GradWatch``
callback.

Example:
    >>> import numpy as np, keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(loss="mse")
    >>> check_gradients(model, np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")).verdict
    'pass'
"""

from gradwatch._extras import missing_extra

try:
    import keras  # noqa: F401  (Keras imports its backend here: TensorFlow by default)
except ModuleNotFoundError as _exc:
    raise missing_extra(_exc, "keras") from _exc

from gradwatch.keras.callback import GradWatch
from gradwatch.keras.checker import assert_gradients, check_gradients
from gradwatch.keras.localize import localize

__all__ = ["GradWatch", "assert_gradients", "check_gradients", "localize"]
