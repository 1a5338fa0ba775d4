"""``training_step`` re-run on the float64 twin: the loss a check differentiates.

The twin is a copy of the LightningModule: its trainer reference is put back (a copy drops it),
``log``/``log_dict`` are silenced (the logged metrics must not change), the methods that step
optimizers refuse (such a step cannot be re-run: ``loss_fn=`` is needed), and SyncBatchNorm
computes as plain BatchNorm (the check is of the local function).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.nn import functional as F

from gradwatch.lightning import _compat
from gradwatch.localization import ROOT
from gradwatch.options import WatchConfig, check_selection, compile_patterns
from gradwatch.torch.checker import TorchChecker
from gradwatch.torch.localize import Localizer, free_memory
from gradwatch.torch.reference import module_state_kept

__all__ = [
    "NO_LIMIT",
    "NotRerunnable",
    "Rerun",
    "SkipCheck",
    "borrowed",
    "check_patterns",
    "prepare_twin",
]

#: ``max_check_memory`` when no device reports its free memory: no limit.
NO_LIMIT = 2**62


def check_patterns(
    config: WatchConfig, module: nn.Module, params: list[tuple[str, nn.Parameter]]
) -> None:
    """``ValueError`` at setup when ``include``/``exclude`` select no parameter (in
    ``mode="modules"``: no module, by name)."""
    names = [n for n, p in params if p.is_floating_point()]
    if config.mode == "modules":  # the patterns select modules by name there
        names = [n or ROOT for n, _ in module.named_modules()]
    check_selection(
        names,
        compile_patterns("include", config.include),
        compile_patterns("exclude", config.exclude),
        what="module" if config.mode == "modules" else "parameter",
    )


class SkipCheck(Exception):
    """``training_step`` returned ``None``: nothing to check this time."""


class NotRerunnable(Exception):
    """``training_step`` touches optimizers itself: it cannot be re-run on a copy."""


def _refuse(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NotRerunnable(
            f"training_step calls self.{name}(), so it cannot be re-run on a copy; pass "
            f"GradWatch(loss_fn=...) to check it"
        )

    return refuse


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


def _plain_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """SyncBatchNorm's forward as plain BatchNorm (the check is of the local function)."""
    return F.batch_norm(
        x,
        self.running_mean,
        self.running_var,
        self.weight,
        self.bias,
        self.training or not self.track_running_stats,
        self.momentum if self.momentum is not None else 0.0,
        self.eps,
    )


def prepare_twin(trainer: Trainer, twin: nn.Module) -> None:
    """Give the copy its trainer back, silence its logging, and make it a local function."""
    if isinstance(twin, LightningModule):
        _compat.uncompile_copy(twin)  # trainer.fit(torch.compile(module)): eager, on the copy
        twin.trainer = trainer
        twin.log = _silent  # type: ignore[method-assign]
        twin.log_dict = _silent  # type: ignore[method-assign]
        twin.optimizers = _refuse("optimizers")  # type: ignore[method-assign]
        twin.manual_backward = _refuse("manual_backward")  # type: ignore[method-assign]
        twin.lr_schedulers = _refuse("lr_schedulers")  # type: ignore[method-assign]
    for m in twin.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.forward = types.MethodType(_plain_batch_norm, m)  # type: ignore[method-assign]


@contextlib.contextmanager
def borrowed(module: nn.Module) -> Iterator[None]:
    """The module itself, ready for a check's ``training_step``: logging silenced, optimizer
    methods refusing, and every plain attribute put back on exit.

    Used for the model's own pass (what the float64 copy is compared with) and for checks that
    evaluate the model itself when the copy is not its function. Outside any autocast: the copy
    is compared with the model's function in its parameters' dtype.
    """
    with module_state_kept(module):
        if isinstance(module, LightningModule):
            vars(module).update(
                log=_silent,
                log_dict=_silent,
                optimizers=_refuse("optimizers"),
                manual_backward=_refuse("manual_backward"),
                lr_schedulers=_refuse("lr_schedulers"),
            )
        yield


class Rerun:
    """The checker of one fit: ``loss_fn(module, batch)``, or ``training_step`` on the twin.

    Args:
        trainer: The Trainer (the twin gets it back).
        module: The LightningModule being trained.
        config: The callback's configuration.
        loss_fn: ``loss_fn(module, batch) -> loss``; ``None`` re-runs ``training_step``.
    """

    def __init__(
        self,
        trainer: Trainer,
        module: LightningModule,
        config: WatchConfig,
        loss_fn: Callable[[LightningModule, Any], Any] | None,
    ) -> None:
        self.trainer = trainer
        self.module = module
        self.config = config
        self.loss_fn = loss_fn
        self.batch_idx = 0
        self._checker: TorchChecker | None = None
        self._localizer: Localizer | None = None
        #: Bytes the float64 copy may take (``None``: the free memory of the module's device,
        #: read at the first check). Under DDP the callback sets rank zero's reading for every
        #: rank, so no rank switches to module-by-module checks alone.
        self.max_check_memory: int | None = None

    def checker(self) -> TorchChecker:
        """The (cached) checker; its float64 twin is built on first use."""
        if self._checker is None:
            self._checker = TorchChecker(
                self.module,
                self.loss_fn if self.loss_fn is not None else self.training_step_loss,  # type: ignore[arg-type]
                **self.config.check_arguments,
                # Under DDP every rank must run the same forward passes (training_step may hold a
                # collective), so no rank may switch paths on its own timing: the loop only.
                vectorize=False if self.trainer.world_size > 1 else None,
                prepare=lambda model, twin: prepare_twin(self.trainer, twin),
                model_context=lambda: borrowed(self.module),
                max_check_memory=self.max_check_memory,
            )
        return self._checker

    def agree_check_memory(self) -> None:
        """Under DDP: rank zero's free-memory reading becomes every rank's ``max_check_memory``
        (whether the float64 copy fits decides how a check runs; ranks must run the same passes).
        Called once the module is on its device."""
        device = next(self.module.parameters()).device
        free = self.trainer.strategy.broadcast(free_memory(device), src=0)
        self.max_check_memory = int(free) if free is not None else NO_LIMIT

    def localizer(self) -> Localizer:
        """The (cached) localization, on the checker's float64 twin."""
        if self._localizer is None:
            checker = self.checker()
            self._localizer = Localizer(
                self.module,
                checker.loss_fn,
                seed=self.config.seed,
                twin=checker.twin() if checker.torch_dtype is torch.float64 else None,
                prepare=lambda model, twin: prepare_twin(self.trainer, twin),
            )
        return self._localizer

    def training_step_loss(self, module: nn.Module, batch: Any) -> Any:
        """The loss ``training_step`` returns on ``module`` (the twin)."""
        try:
            out = module.training_step(batch, self.batch_idx)  # type: ignore[operator]
        except NotRerunnable as exc:
            raise RuntimeError(str(exc)) from exc
        if out is None:
            raise SkipCheck
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise ValueError("training_step returned a dict without a 'loss' key")
            out = out["loss"]
        return out
