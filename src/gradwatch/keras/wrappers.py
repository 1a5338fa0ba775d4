"""What gradwatch sets on a Keras model and its optimizer, and how it is removed.

Every wrapper gradwatch installs (``train_step``, the optimizer's ``apply``,
``make_train_function``) carries a mark, so :func:`repair` can remove what an interrupted ``fit``
left behind, whoever calls it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["jit_compiled", "mark_wrapper", "repair"]

#: Marks every attribute gradwatch sets on a model or optimizer.
_MARK = "_gradwatch_wrapper"


def mark_wrapper(fn: Any) -> Any:
    """Mark ``fn`` as gradwatch's (so :func:`repair` finds it) and return it."""
    setattr(fn, _MARK, True)
    return fn


def repair(model: Any) -> bool:
    """Remove every gradwatch wrapper left on ``model`` and its optimizer; rebuild if any was.

    Example:
        >>> repair(object())
        False
    """
    found = False
    opt = getattr(model, "optimizer", None)
    owners = [model, opt, getattr(opt, "inner_optimizer", None)]
    for obj in owners:
        attrs = getattr(obj, "__dict__", {})
        for name in [k for k, v in attrs.items() if getattr(v, _MARK, False)]:
            delattr(obj, name)
            found = True
    if found:
        model.train_function = None
    return found


def jit_compiled(model: Any) -> bool:
    """Whether the model's train function is compiled with XLA (``jit_compile`` resolved)."""
    return not getattr(model, "run_eagerly", False) and bool(getattr(model, "jit_compile", False))
