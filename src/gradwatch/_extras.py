"""A missing framework named with the extra that installs it.

Example:
    >>> err = missing_extra(ModuleNotFoundError("No module named 'torch'", name="torch"), "lightning")
    >>> print(err)
    torch is not installed (gradwatch.lightning needs it): pip install "gradwatch[lightning]"
"""

from __future__ import annotations

__all__ = ["missing_extra"]

_TENSORFLOW_HINT = (
    "; that installs tensorflow-cpu: for TensorFlow on a GPU, pip install "
    '"gradwatch[keras]" "tensorflow[and-cuda]" instead, or use another Keras backend '
    "(KERAS_BACKEND=jax or torch, with that package installed)"
)


def missing_extra(exc: ModuleNotFoundError, adapter: str) -> ModuleNotFoundError:
    """``exc`` again, its message naming the extra that installs the missing module.

    Args:
        exc: The error of importing the framework.
        adapter: ``"keras"`` or ``"lightning"``: the gradwatch adapter being imported (its extra
            installs what it needs; Keras' default TensorFlow backend has its own extra).
    """
    top = (exc.name or "").split(".")[0] or "a required package"
    extra, hint = adapter, ""
    if top == "tensorflow":
        extra, hint = "tensorflow", _TENSORFLOW_HINT
    return ModuleNotFoundError(
        f"{top} is not installed (gradwatch.{adapter} needs it): "
        f'pip install "gradwatch[{extra}]"{hint}',
        name=exc.name,
    )
