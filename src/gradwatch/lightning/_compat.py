"""Private Lightning (and TensorBoard-writer) attributes gradwatch relies on, in one place.

Each is read from Lightning 2.2-2.6 (the range ``pyproject.toml`` allows);
``tests/lightning/test_compat.py`` fails loudly if one disappears, instead of gradwatch going
silently wrong. Where an attribute is missing the functions fall back to the public API.
"""

from __future__ import annotations

import types
from typing import Any

from lightning.pytorch import LightningModule, Trainer

__all__ = ["callback_metrics", "optimizer_step", "tensorboard_file_writer", "uncompile_copy"]

#: The methods ``trainer.fit(torch.compile(module))`` replaces by compiled ones.
COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def optimizer_step(trainer: Trainer) -> int:
    """The step Lightning's loggers label the current optimizer step with (0-based).

    ``fit_loop.epoch_loop._batches_that_stepped`` (Lightning 2.2-2.6), which Lightning's logger
    connector uses as the step of ``log_metrics``; ``trainer.global_step`` counts every optimizer
    (two per step with two optimizers) and is the fallback.
    """
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    return int(stepped) if stepped is not None else int(trainer.global_step)


def callback_metrics(trainer: Trainer) -> dict[str, Any]:
    """``trainer.callback_metrics`` as a dict to write into, without the property's merge.

    ``trainer._logger_connector._callback_metrics`` (Lightning 2.2-2.6): the property merges the
    logged results on every access, which costs more than the write it serves.
    """
    connector = getattr(trainer, "_logger_connector", None)
    metrics = getattr(connector, "_callback_metrics", None)
    return metrics if isinstance(metrics, dict) else trainer.callback_metrics


def tensorboard_file_writer(experiment: Any) -> Any:
    """The file writer of a ``SummaryWriter`` (``_get_file_writer()``, torch 2.2-2.13), or ``None``.

    Needed only to add a raw ``Summary`` proto (the custom-scalars layout).
    """
    get = getattr(experiment, "_get_file_writer", None)
    return get() if callable(get) else None


def uncompile_copy(copy: LightningModule) -> bool:
    """Give a copy of a compiled LightningModule its eager methods back, bound to the copy.

    ``trainer.fit(torch.compile(module))`` unwraps the module and sets compiled ``forward``,
    ``training_step``, ... as instance attributes, keeping the originals in ``_compiler_ctx``
    (Lightning 2.2-2.6, ``utilities/compile.py``). A deep copy keeps those compiled functions, which
    are bound to the *original* module: the copy's ``training_step`` would compute on the model,
    not the copy (and compile it again for every new input dtype). Returns whether it did anything.

    Example:
        >>> uncompile_copy(LightningModule())
        False
    """
    ctx = getattr(copy, "_compiler_ctx", None)
    if not isinstance(ctx, dict):
        return False
    for name in COMPILED_METHODS:
        original = ctx.get(f"original_{name}")
        func = getattr(original, "__func__", None)
        if func is not None:
            setattr(copy, name, types.MethodType(func, copy))
    copy._compiler_ctx = None
    return True
