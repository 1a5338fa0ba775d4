"""Private Keras attributes gradwatch relies on, in one place.

Each is read from Keras 3.5-3.15 (the range ``pyproject.toml`` allows); ``tests/keras/test_compat.py``
fails loudly if one disappears, instead of gradwatch going silently wrong.
"""

from __future__ import annotations

from typing import Any

__all__ = ["optimizer_variables"]


def optimizer_variables(optimizer: Any) -> list[Any]:
    """The variables an optimizer was built for, in the order ``apply`` receives gradients.

    ``BaseOptimizer._trainable_variables`` (Keras 3.5-3.15): ``apply(grads)`` without variables
    pairs the gradients with this list.
    """
    return list(optimizer._trainable_variables)
