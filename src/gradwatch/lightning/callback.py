"""``GradWatch`` for Lightning: ``Trainer(callbacks=[GradWatch()])``.

Norms are read in ``on_before_optimizer_step`` (unscaled under mixed precision, before clipping)
with one fused reduction and one host transfer; checks run in ``on_train_batch_end`` on the live
batch, on a float64 twin of the module whose ``training_step`` is re-run with logging silenced
(or on ``loss_fn(module, batch)``). Under DDP every rank checks its own batch at the same steps with
the same coordinates, and the ranks agree on events, actions and the schedule with one collective
per check.

Example:
    >>> from gradwatch.lightning import GradWatch
    >>> cb = GradWatch(check_every_n_steps=50, on_explode="halt")
    >>> cb.config.on_explode
    'halt'
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import types
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.nn import functional as F

import torch
from gradwatch.core.policy import Action
from gradwatch.core.schedule import BudgetSchedule
from gradwatch.options import WatchConfig
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.torch.checker import TorchChecker
from gradwatch.torch.twin import clean_name, uncastable
from gradwatch.watch import tags
from gradwatch.watch.watcher import Watcher, WatchRecords, global_norm
from torch import nn

__all__ = ["GradWatch"]

logger = logging.getLogger("gradwatch")

#: Consecutive steps skipped by the GradScaler before the collapsing scale is an event.
SKIPPED_STEPS_EVENT = 10
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class _SkipCheck(Exception):
    """``training_step`` returned ``None``: nothing to check this time."""


class _NotRerunnable(Exception):
    """``training_step`` touches optimizers itself: it cannot be re-run on a copy."""


def _refuse(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _NotRerunnable(
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


def _callback_metrics(trainer: Trainer) -> dict[str, Any]:
    """``trainer.callback_metrics`` without the property's per-access merge of logged results."""
    connector = getattr(trainer, "_logger_connector", None)
    metrics = getattr(connector, "_callback_metrics", None)
    return metrics if isinstance(metrics, dict) else trainer.callback_metrics


class GradWatch(WatchRecords, Callback):
    """Gradient checks and gradient-health monitoring for a Lightning ``Trainer``.

    Args:
        check_every_n_steps: ``None``: a check on the first optimizer step, then checks spaced so
            their measured cost stays under ``max_overhead`` of training time. An integer ≥ 1: a
            fixed period.
        num_params: Coordinates per check; tensors are visited round-robin when there are more.
        mode: ``"coordinate"`` or ``"directional"``.
        dtype: ``"float64"`` (a float64 twin), ``"float32"`` or ``None`` (the model's dtype).
        enable_checks: Run finite-difference checks.
        enable_norms: Compute gradient norms and apply the health rules.
        norm_every_n_steps: Feed the health rules every this many optimizer steps.
        log_every_n_steps: Write norms every this many steps (``None``: the Trainer's).
        vanish_threshold: Absolute gradient RMS below which a tensor is vanishing.
        explode_threshold: Gradient RMS above which a tensor is exploding.
        patience: Observations a vanishing condition must last before it is an event.
        on_mismatch: Policy for ``mismatch`` and ``disconnected``: ignore, warn, halt or raise.
        on_vanish: Policy for ``vanishing``.
        on_explode: Policy for ``exploding``.
        on_nonfinite: Policy for ``nonfinite``.
        max_overhead: Share of training time the default schedule may spend on checks.
        seed: Seed of the private sampling generator (combined with the step).
        eps: Base finite-difference step (default ``cbrt(eps_machine)``).
        rtol: Tolerance (default by dtype).
        include: Regular expression(s): check only matching parameters.
        exclude: Regular expression(s): do not check matching parameters.
        jsonl_path: Also write every record as JSON lines there.
        loss_fn: ``loss_fn(module, batch) -> loss`` to check instead of re-running
            ``training_step``; required for manual optimization.
    """

    def __init__(
        self,
        check_every_n_steps: int | None = None,
        num_params: int = 32,
        mode: str = "coordinate",
        dtype: str | None = "float64",
        enable_checks: bool = True,
        enable_norms: bool = True,
        norm_every_n_steps: int = 1,
        log_every_n_steps: int | None = None,
        vanish_threshold: float = 1e-7,
        explode_threshold: float = 1e3,
        patience: int = 3,
        on_mismatch: str = "warn",
        on_vanish: str = "warn",
        on_explode: str = "warn",
        on_nonfinite: str = "halt",
        max_overhead: float = 0.02,
        seed: int = 0,
        eps: float | None = None,
        rtol: float | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        jsonl_path: str | None = None,
        loss_fn: Callable[[LightningModule, Any], Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = WatchConfig.from_arguments(locals())
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(module, batch), got {loss_fn!r}")
        self.loss_fn = loss_fn
        self._watcher = Watcher(self.config)
        self._checker: TorchChecker | None = None
        self._checks_on = self.config.enable_checks
        self._params: list[tuple[str, nn.Parameter]] = []
        self._log_every = 50
        self._pending: dict[str, float] = {}
        self._stepped = False
        self._t_start = 0.0
        self._step_times: deque[float] = deque(maxlen=50)
        self._next_due: int | None = None
        self._consecutive_skips = 0
        self._warned: set[str] = set()
        self._trainer: Trainer | None = None
        self._batch_idx = 0
        self._state_key: str | None = None
        self._owned_cache: dict[
            int, tuple[tuple[int, int, int], list[tuple[str, nn.Parameter]]]
        ] = {}

    # -- public records ------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        """Optimizer steps the GradScaler skipped (overflowing gradients under ``16-mixed``)."""
        return self._watcher.skipped_steps

    @property
    def state_key(self) -> str:
        # Lightning asks for it often; it depends on the arguments only.
        if self._state_key is None:
            self._state_key = self._generate_state_key(
                check_every_n_steps=self.config.check_every_n_steps,
                num_params=self.config.num_params,
                mode=self.config.mode,
                include=self.config.include,
                exclude=self.config.exclude,
            )
        return self._state_key

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _step(trainer: Trainer) -> int:
        loop = getattr(trainer.fit_loop, "epoch_loop", None)
        stepped = getattr(loop, "_batches_that_stepped", None)
        return int(stepped) if stepped is not None else int(trainer.global_step)

    @staticmethod
    def _distributed(trainer: Trainer) -> bool:
        return (
            trainer.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        )

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        if self._checks_on and not pl_module.automatic_optimization and self.loss_fn is None:
            raise ValueError(
                "GradWatch: manual optimization (automatic_optimization=False) needs "
                "loss_fn=lambda module, batch: <scalar loss>, because training_step steps the "
                "optimizers itself and cannot be re-run for a check; or pass enable_checks=False"
            )
        strategy = type(trainer.strategy).__name__
        if self._checks_on and strategy in _SHARDED:
            self._checks_on = False
            self._warn_once(
                "sharded",
                f"GradWatch: gradient checks are switched off under {strategy}: parameters are "
                f"sharded across ranks, so no rank holds the whole model to perturb; norms go on",
            )
        self._params = [
            (clean_name(n), p) for n, p in pl_module.named_parameters() if p.requires_grad
        ]
        self._owned_cache = {}
        self._watcher.start({n: tuple(p.shape) for n, p in self._params})
        self._log_every = self.config.log_every_n_steps or max(
            1, int(getattr(trainer, "log_every_n_steps", 50))
        )
        self._checker = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stepped = False
        self._t_start = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        if not self.config.enable_norms:
            return
        step = self._step(trainer)
        if step % self.config.norm_every_n_steps != 0:
            return
        named = [(n, p.grad) for n, p in self._owned(optimizer) if p.grad is not None]
        if not named:
            return
        norms = self._norms(named)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                scale = float(scaler.get_scale())  # fused optimizers unscale inside step()
                if scale > 0:
                    norms = {k: x / scale for k, x in norms.items()}
            if not all(math.isfinite(x) for x in norms.values()):
                # The GradScaler will skip this update: routine under 16-mixed, not an event.
                self._watcher.skipped_steps += 1
                self._consecutive_skips += 1
                if self._consecutive_skips == SKIPPED_STEPS_EVENT:
                    self._act(
                        trainer,
                        self._watcher.observe_event(
                            GradientEvent(
                                step=step,
                                kind="nonfinite",
                                param="global",
                                value=float(self._consecutive_skips),
                                threshold=float(SKIPPED_STEPS_EVENT),
                                message=(
                                    f"the GradScaler skipped {self._consecutive_skips} optimizer steps in "
                                    f"a row (overflowing gradients, loss scale {scaler.get_scale():.3g}): "
                                    f"the loss scale is collapsing; try bf16-mixed, a lower learning "
                                    f"rate or gradient clipping"
                                ),
                            )
                        ),
                        events=None,
                    )
                return
            self._consecutive_skips = 0
        self._pending.update(norms)
        if step % self._log_every == 0 and trainer.global_rank == 0:
            self._write_histograms(trainer, named, step)

    def _owned(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
        """The watched parameters this optimizer steps (cached until its groups change)."""
        groups = optimizer.param_groups
        key = (id(optimizer), len(groups), sum(len(g["params"]) for g in groups))
        cached = self._owned_cache.get(key[0])
        if cached is None or cached[0] != key:
            ids = {id(p) for g in groups for p in g["params"]}
            cached = (key, [(n, p) for n, p in self._params if id(p) in ids])
            self._owned_cache[key[0]] = cached
        return cached[1]

    @staticmethod
    def _norms(named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """L2 norm of every gradient: one fused reduction per device/dtype, one host transfer."""
        dense = [(n, g) for n, g in named if not g.is_sparse]
        sparse = [(n, g) for n, g in named if g.is_sparse]
        values: list[torch.Tensor] = []
        if dense:
            values.extend(torch._foreach_norm([g for _, g in dense]))
        for _, g in sparse:
            values.append(torch.linalg.vector_norm(g.coalesce().values()))
        if not values:
            return {}
        try:
            stacked = torch.stack(values)  # promotes mixed dtypes
        except RuntimeError:  # tensors on several devices
            first = values[0]
            stacked = torch.stack([x.to(device=first.device, dtype=torch.float32) for x in values])
        if stacked.dtype != torch.float32 or stacked.device.type != "cpu":
            stacked = stacked.float().cpu()
        host = stacked.tolist()
        names = [n for n, _ in dense] + [n for n, _ in sparse]
        return dict(zip(names, host, strict=True))

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._stepped:
            return  # accumulating: the optimizer has not stepped on this micro-batch
        train_seconds = time.perf_counter() - self._t_start
        step = self._step(trainer)
        rank0 = trainer.global_rank == 0
        if rank0:
            meta = self._watcher.meta_once()
            if meta is not None:
                for w in self._tensorboards(trainer):
                    w.add_text(tags.META_TAG, json.dumps(meta), step)
                    with contextlib.suppress(Exception):  # a layout is a nicety, never an error
                        w._get_file_writer().add_summary(tags.custom_scalars_layout())
        if self._pending:
            norms, self._pending = self._pending, {}
            write = step % self._log_every == 0
            events, action = self._watcher.observe_norms(step, norms, write=write and rank0)
            gnorm = global_norm(norms)
            _callback_metrics(trainer)[tags.GLOBAL_NORM_TAG] = torch.tensor(gnorm)
            if write and rank0:
                self._log_scalars(trainer, tags.norm_scalars(norms, gnorm), step)
            self._act(trainer, action, events)
        if self._checks_on and self._due(trainer, step):
            self._run_check(trainer, pl_module, batch, batch_idx, step)
        self._watcher.schedule.record_step(train_seconds)
        self._step_times.append(train_seconds)

    def _due(self, trainer: Trainer, step: int) -> bool:
        if self._next_due is not None:
            return step >= self._next_due
        return self._watcher.schedule.due(step)

    def _run_check(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, step: int
    ) -> None:
        started = time.perf_counter()
        report: CheckReport | None = None
        disable = False
        odd = uncastable(batch)
        if odd:
            self._warn_once(
                f"batch:{odd[0]}",
                f"GradWatch: cannot cast a batch holding {odd[0]} to float64; the check at step "
                f"{step} is skipped (pass loss_fn=... that builds the inputs itself)",
            )
        else:
            try:
                checker = self._get_checker(trainer, pl_module)
                self._batch_idx = batch_idx
                report = checker.check(
                    batch,
                    step=step,
                    tensors=self._watcher.tensors_for_check(len(checker.names)),
                    sample_seed=(self.config.seed, step),
                )
            except _SkipCheck:
                self._warn_once(
                    "none",
                    f"GradWatch: training_step returned None at step {step}; that check is skipped "
                    f"(checks stay on)",
                )
            except Exception as exc:
                disable = True
                cause = exc.__cause__ if isinstance(exc.__cause__, _NotRerunnable) else exc
                self._warn_once(
                    "check-error",
                    f"GradWatch: the gradient check at step {step} failed ({type(cause).__name__}: "
                    f"{cause}); checks are switched off, norms go on",
                )
        seconds = time.perf_counter() - started
        events = list(report.events) if report is not None else []
        if self._distributed(trainer):
            events, disable, next_due = self._agree(trainer, events, disable, step, seconds)
            self._next_due = next_due
        self._watcher.schedule.record_check(seconds)
        decision = self._watcher.schedule_decision(step)
        if self._next_due is not None:
            decision = f"{decision}; all ranks check next at step {self._next_due}"
        if trainer.global_rank == 0:
            for w in self._tensorboards(trainer):
                w.add_text(tags.SCHEDULE_TAG, decision, step)
        if disable:
            self._checks_on = False
        if report is None:
            return
        action = self._watcher.observe_report(report)
        extra = [e for e in events if e not in report.events]
        if extra:
            other = self._watcher.observe_event
            for e in extra:
                sub = other(e)
                action = action.merged(sub)
        if trainer.global_rank == 0:
            self._log_scalars(trainer, tags.report_scalars(report), step)
        self._act(trainer, action, events)

    def _agree(
        self,
        trainer: Trainer,
        events: list[GradientEvent],
        disable: bool,
        step: int,
        seconds: float,
    ) -> tuple[list[GradientEvent], bool, int | None]:
        """One collective per check: every rank's events, whether any rank gave up, rank 0's plan."""
        next_due: int | None = None
        schedule = self._watcher.schedule
        if isinstance(schedule, BudgetSchedule):
            probe = BudgetSchedule(schedule.max_overhead)
            probe.record_check(seconds)
            mean = sum(self._step_times) / len(self._step_times) if self._step_times else 0.0
            next_due = step + probe.steps_until_due(mean)
        mine = {
            "events": [e.to_dict() for e in events],
            "disable": disable,
            "next_due": next_due,
        }
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, mine)
        merged = list(events)
        own = trainer.global_rank
        for rank, item in enumerate(gathered):
            if rank == own or item is None:
                continue
            for d in item["events"]:
                e = GradientEvent.from_dict(d)
                merged.append(
                    GradientEvent(
                        e.step, e.kind, e.param, e.value, e.threshold, f"(rank {rank}) {e.message}"
                    )
                )
        any_disable = any(bool(item and item["disable"]) for item in gathered)
        plan = gathered[0]["next_due"] if gathered[0] is not None else next_due
        return merged, any_disable, plan

    def _get_checker(self, trainer: Trainer, pl_module: LightningModule) -> TorchChecker:
        if self._checker is None:
            loss = self.loss_fn if self.loss_fn is not None else self._training_step_loss

            def prepare(model: nn.Module, twin: nn.Module) -> None:
                self._prepare_twin(trainer, twin)

            self._checker = TorchChecker(
                pl_module,
                loss,  # type: ignore[arg-type]
                num_params=self.config.num_params,
                mode=self.config.mode,
                dtype=self.config.dtype,
                eps=self.config.eps,
                rtol=self.config.rtol,
                seed=self.config.seed,
                include=self.config.include,
                exclude=self.config.exclude,
                # Under DDP every rank must run the same forward passes (training_step may hold a
                # collective), so no rank may switch paths on its own timing: the loop only.
                vectorize=False if self._distributed(trainer) else None,
                prepare=prepare,
            )
        return self._checker

    def _training_step_loss(self, module: nn.Module, batch: Any) -> Any:
        try:
            out = module.training_step(batch, self._batch_idx)  # type: ignore[operator]
        except _NotRerunnable as exc:
            raise RuntimeError(str(exc)) from exc
        if out is None:
            raise _SkipCheck
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise ValueError("training_step returned a dict without a 'loss' key")
            out = out["loss"]
        return out

    @staticmethod
    def _prepare_twin(trainer: Trainer, twin: nn.Module) -> None:
        """Give the copy its trainer back, silence its logging, and make it a local function."""
        if isinstance(twin, LightningModule):
            twin.trainer = trainer
            twin.log = _silent  # type: ignore[method-assign]
            twin.log_dict = _silent  # type: ignore[method-assign]
            twin.optimizers = _refuse("optimizers")  # type: ignore[method-assign]
            twin.manual_backward = _refuse("manual_backward")  # type: ignore[method-assign]
            twin.lr_schedulers = _refuse("lr_schedulers")  # type: ignore[method-assign]
        for m in twin.modules():
            if isinstance(m, nn.SyncBatchNorm):
                m.forward = types.MethodType(_plain_batch_norm, m)  # type: ignore[method-assign]

    # -- writing and acting --------------------------------------------------------------------
    @staticmethod
    def _log_scalars(trainer: Trainer, scalars: Mapping[str, float], step: int) -> None:
        if not scalars:
            return
        for lg in trainer.loggers:
            lg.log_metrics(dict(scalars), step=step)

    @staticmethod
    def _tensorboards(trainer: Trainer) -> list[Any]:
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _write_histograms(
        self, trainer: Trainer, named: Sequence[tuple[str, torch.Tensor]], step: int
    ) -> None:
        writers = self._tensorboards(trainer)
        if not writers:
            return
        for name, g in named:
            values = (g.coalesce().values() if g.is_sparse else g).detach().float().cpu()
            if not torch.isfinite(values).all():
                continue
            for w in writers:
                w.add_histogram(tags.hist_tag(name), values, step)

    def _act(
        self, trainer: Trainer, action: Action, events: Sequence[GradientEvent] | None
    ) -> None:
        if not events and action.error is None and not action.halt:
            return  # the common case, every step
        if trainer.global_rank == 0:
            for w in self._tensorboards(trainer):
                for e in events or ():
                    w.add_text(tags.EVENTS_TAG, tags.event_text(e), e.step)
        if action.error is not None:
            self._flush(trainer)
            raise action.error
        if action.halt:
            trainer.should_stop = True

    def _flush(self, trainer: Trainer) -> None:
        self._watcher.flush()
        for w in self._tensorboards(trainer):
            w.flush()
        for lg in trainer.loggers:
            with contextlib.suppress(Exception):
                lg.save()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        events, action = self._watcher.flush_health()  # the last, partly filled block
        try:
            self._act(trainer, action, events)
        finally:
            self._flush(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._watcher.close()
        self._checker = None

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "watcher": self._watcher.state_dict(),
            "next_due": self._next_due,
            "checks_on": self._checks_on,
            "consecutive_skips": self._consecutive_skips,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._watcher.load_state_dict(state_dict.get("watcher", {}))
        self._next_due = state_dict.get("next_due")
        self._checks_on = bool(state_dict.get("checks_on", self._checks_on))
        self._consecutive_skips = int(state_dict.get("consecutive_skips", 0))
