"""``GradWatch`` for Lightning: hooks only — hook -> watcher -> act.

Norms are read in ``on_before_optimizer_step`` (unscaled under mixed precision, before clipping;
:mod:`~gradwatch.lightning.norms`); checks run in ``on_train_batch_end`` on the live batch, on a
float64 twin whose ``training_step`` is re-run with logging silenced, or on ``loss_fn(module,
batch)`` (:mod:`~gradwatch.lightning.rerun`). Under DDP the ranks agree after every check
(:mod:`~gradwatch.lightning.distributed`). Everything written goes through the watcher to the
Trainer's loggers (:mod:`~gradwatch.lightning.sinks`) and the JSON-lines file. The per-step calm
test and the skipping of an update are in :mod:`~gradwatch.lightning.guard`.

Example:
    >>> from gradwatch.lightning import GradWatch
    >>> cb = GradWatch(check_every_n_steps=50, on_explode="halt")
    >>> cb.config.on_explode
    'halt'
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from gradwatch.core.policy import Action
from gradwatch.lightning import _compat
from gradwatch.lightning.distributed import agree_action, agree_after_check, agree_calm
from gradwatch.lightning.guard import UpdateGuard, skipped_update_error
from gradwatch.lightning.localizing import FailureLocalizer, rank_zero_decides, with_events
from gradwatch.lightning.norms import GradNorms
from gradwatch.lightning.rerun import NotRerunnable, Rerun, SkipCheck, check_patterns
from gradwatch.lightning.sinks import LoggersSink
from gradwatch.localization import LocalizationReport
from gradwatch.options import DType, Mode, Policy, WatchConfig
from gradwatch.report import CheckReport
from gradwatch.torch import _compat as torch_compat
from gradwatch.torch.twin import clean_name, uncastable
from gradwatch.watch import tags
from gradwatch.watch.watcher import HEALTH_BLOCK, Watcher, WatchRecords

__all__ = ["GradWatch"]

#: What to do when a check raised (the error is in the ``unchecked`` event's message).
_FIX = (
    "pass GradWatch(loss_fn=lambda module, batch: ...) that a float64 copy of the module can "
    "run, or enable_checks=False"
)
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a value to the host costs no synchronisation (the CPU)."""
    return device.type == "cpu"


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
        log_every_n_steps: Write norms every this many steps (``None``: the Trainer's; ``0``:
            only the norms of steps with an event).
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

    Raises:
        ValueError: At construction, a bad argument (the message names it, the allowed values
            and the value given). At ``setup``, before the first step: manual optimization
            without ``loss_fn``, or ``include``/``exclude`` matching no trainable parameter.
    """

    def __init__(
        self,
        check_every_n_steps: int | None = None,
        num_params: int = 32,
        mode: Mode = "coordinate",
        dtype: DType | None = "float64",
        enable_checks: bool = True,
        enable_norms: bool = True,
        norm_every_n_steps: int = 1,
        log_every_n_steps: int | None = None,
        vanish_threshold: float = 1e-7,
        explode_threshold: float = 1e3,
        patience: int = 3,
        on_mismatch: Policy = "warn",
        on_vanish: Policy = "warn",
        on_explode: Policy = "warn",
        on_nonfinite: Policy = "halt",
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
        self._watcher = Watcher(self.config, first_step=0, framework="lightning")
        self._norms = GradNorms([])
        self._rerun: Rerun | None = None
        c = self.config
        # The per-step calm test and the update skipping (stopping on_nonfinite / on_explode).
        self._update_guard = UpdateGuard(c)
        self._guard = self._update_guard.on
        # Health actions that can stop training are agreed across ranks.
        self._agree = any(c.stops(k) for k in ("on_vanish", "on_explode", "on_nonfinite"))
        self._step_rows: list[tuple[tuple[str, ...], torch.Tensor]] = []
        self._rows: list[torch.Tensor] = []
        self._row_steps: list[int] = []
        self._row_names: tuple[str, ...] = ()
        self._stepped = False
        self._t_start = 0.0
        self._state_key: str | None = None
        self._localizer = FailureLocalizer(self.config.max_overhead)

    # -- public records ------------------------------------------------------------------------
    @property
    def localizations(self) -> list[LocalizationReport]:
        """The latest localizations: one per failing check that was localized (at most 16)."""
        return self._localizer.reports

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

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        w = self._watcher
        w.reset()  # each fit starts fresh; a checkpoint is restored after this (load_state_dict)
        if w.checks_on and not pl_module.automatic_optimization and self.loss_fn is None:
            raise ValueError(
                "GradWatch: manual optimization (automatic_optimization=False) needs "
                "loss_fn=lambda module, batch: <scalar loss>, because training_step steps the "
                "optimizers itself and cannot be re-run for a check; or pass enable_checks=False"
            )
        strategy = type(trainer.strategy).__name__
        params = [(clean_name(n), p) for n, p in pl_module.named_parameters() if p.requires_grad]
        if w.checks_on and strategy not in _SHARDED:
            check_patterns(self.config, pl_module, params)
        w.open(
            [LoggersSink(trainer)],
            writer=trainer.global_rank == 0,
            log_every=int(getattr(trainer, "log_every_n_steps", 50)),
        )
        if w.checks_on and strategy in _SHARDED:
            w.checks_on = False
            w.unchecked(
                _compat.optimizer_step(trainer),
                "sharded",
                f"gradient checks are switched off under {strategy} because its parameters are "
                f"sharded across ranks and no rank holds the whole model to perturb (norms go on): "
                f"check the model unsharded with gradwatch.torch.check_gradients on one batch, or "
                f"pass enable_checks=False",
            )
        self._norms = GradNorms(params)
        self._update_guard.setup(pl_module)
        self._step_rows, self._rows, self._row_steps, self._row_names = [], [], [], ()
        w.start({n: tuple(p.shape) for n, p in params})
        self._rerun = Rerun(trainer, pl_module, self.config, self.loss_fn)
        self._localizer = FailureLocalizer(self.config.max_overhead)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1 and self._rerun is not None and self._watcher.checks_on:
            self._rerun.agree_check_memory()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stepped = False
        self._update_guard.snapshot()
        self._t_start = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        self._update_guard.snapshot_due = True  # the next batch opens a new accumulation window
        w = self._watcher
        step = _compat.optimizer_step(trainer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        observed = w.observes(step)
        if not (observed or self._guard or scaler is not None):
            return
        named = self._norms.grads(optimizer)
        if not named:
            return
        scale = 1.0
        if scaler is not None and torch_compat.optimizer_unscales_itself(optimizer):
            scale = float(scaler.get_scale()) or 1.0  # fused optimizers unscale inside step()
        # Without a per-step read on an accelerator, squares are summed in float64 there, so a
        # float32 overflow cannot pass for a non-finite gradient when the block is read.
        read_now = self._guard or scaler is not None or host_reads_are_free(named[0][1].device)
        vector = self._norms.vector(named, scale, wide=not read_now)
        names = self._norms.names(named)  # the order of the vector's entries
        if read_now:
            # The one host read per step (on the CPU it costs no synchronisation): are all
            # norms finite and under the explode limit? Agreed across ranks (one all-reduce).
            limit = self._update_guard.limit(names, vector.device, w.explode_limits)
            if not agree_calm(trainer, (vector <= limit).all()):
                self._not_calm(trainer, step, optimizer, named, vector, scale, scaler)
                return
            if scaler is not None:
                w.observe_skipped_step(step, False, 1.0, "GradScaler")
        if observed:
            self._step_rows.append((names, vector))
            w.write_histograms(step, lambda: self._norms.histograms(named))

    def _not_calm(
        self,
        trainer: Trainer,
        step: int,
        optimizer: torch.optim.Optimizer,
        named: list[tuple[str, torch.Tensor]],
        vector: torch.Tensor,
        scale: float,
        scaler: Any,
    ) -> None:
        """A step with a non-finite or exploding norm: judged now, before the optimizer steps.

        The update is skipped whenever a stopping policy covers what this step's gradients show —
        decided from the norms themselves, so a step later in the same episode (no new event:
        ``min_epochs`` keeps training going, or a second optimizer steps on the same batch) is
        skipped too.
        """
        w = self._watcher
        values = self._norms.exact(named, vector, scale)
        nonfinite = not all(math.isfinite(x) for x in values)
        if scaler is not None:
            # An overflow makes the GradScaler skip this update: routine under 16-mixed.
            self._act(
                trainer,
                w.observe_skipped_step(
                    step, nonfinite, float(scaler.get_scale()) if nonfinite else 1.0, "GradScaler"
                ),
            )
            if nonfinite:
                return
        self._act(trainer, self._read_rows(trainer))  # earlier steps first, in step order
        names = self._norms.names(named)
        norms = dict(zip(names, values, strict=True))
        _, action = w.observe_norms(step, norms)
        action = agree_action(trainer, action) if self._agree else action
        policy = self._update_guard.stopping_policy(nonfinite, values, w.explode_limits(names))
        if policy is not None:
            self._skip_update(optimizer, scaler)
            if policy == "raise" and action.error is None:
                action = action.merged(Action(error=skipped_update_error(step, nonfinite)))
            action = action.merged(Action(halt=True))
        self._act(trainer, action)

    def _skip_update(self, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        """The coming ``optimizer.step()`` changes nothing (:meth:`UpdateGuard.skip_update`)."""
        self._update_guard.skip_update(optimizer, scaler)

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
        w = self._watcher
        step = _compat.optimizer_step(trainer)
        if self._step_rows:
            rows, self._step_rows = self._step_rows, []
            names = tuple(n for row_names, _ in rows for n in row_names)
            device = rows[0][1].device
            vector = torch.cat([v.to(device) for _, v in rows]) if len(rows) > 1 else rows[0][1]
            self._queue_row(trainer, step, names, vector)
        if w.check_due(step):
            self._check(trainer, batch, batch_idx, step)
        w.record_step(train_seconds)
        self._localizer.record_step(train_seconds)

    def _queue_row(
        self, trainer: Trainer, step: int, names: tuple[str, ...], vector: torch.Tensor
    ) -> None:
        """Keep a step's norms on the device; read them with the rest of their block."""
        if names != self._row_names:
            self._act(trainer, self._read_rows(trainer))
            self._row_names = names
        self._rows.append(vector)
        self._row_steps.append(step)
        if len(self._rows) >= HEALTH_BLOCK:
            self._act(trainer, self._read_rows(trainer))

    def _read_rows(self, trainer: Trainer) -> Action:
        """The waiting norm rows, read to the host at once and judged (one transfer per block)."""
        if not self._rows:
            return Action()
        rows, self._rows = self._rows, []
        steps, self._row_steps = self._row_steps, []
        host = self._to_host(rows)
        # The latest global norm for EarlyStopping/ModelCheckpoint monitors: up to a block old
        # within an epoch, exact at its end (the block is read in on_train_epoch_end).
        metrics = _compat.callback_metrics(trainer)
        metrics[tags.GLOBAL_NORM_TAG] = torch.tensor(float(np.sqrt(np.nansum(host[-1] ** 2))))
        _, action = self._watcher.observe_norm_rows(steps, self._row_names, host)
        return agree_action(trainer, action) if self._agree else action

    def _to_host(self, rows: list[torch.Tensor]) -> npt.NDArray[np.float64]:
        """The block's norm rows and the weights' norms, in one device-to-host transfer.

        The weight norms go to the watcher (the relative vanishing rule); the rows are returned.
        """
        stacked = torch.stack(rows).double()
        weights = self._norms.weight_vector(stacked.device).double()
        host = torch.cat([stacked.flatten(), weights]).cpu().numpy()
        cut = stacked.numel()
        names = [n for n, _ in self._norms.params]
        self._watcher.observe_weight_norms(dict(zip(names, host[cut:].tolist(), strict=True)))
        return np.asarray(host[:cut].reshape(stacked.shape), dtype=np.float64)

    def _check(self, trainer: Trainer, batch: Any, batch_idx: int, step: int) -> None:
        w = self._watcher
        started = time.perf_counter()
        report: CheckReport | None = None
        failure: str | None = None
        action = Action()
        odd = uncastable(batch)
        if odd:
            action = w.unchecked(
                step,
                f"batch:{odd[0]}",
                f"the check at step {step} is skipped because a batch holding {odd[0]} cannot be "
                f"cast to float64 (checks stay on): pass GradWatch(loss_fn=lambda module, batch: "
                f"...) that builds the inputs itself",
            )
        elif self._rerun is not None:
            try:
                self._rerun.batch_idx = batch_idx
                checker = self._rerun.checker()
                report = checker.check(
                    batch,
                    step=step,
                    tensors=w.tensors_for_check(len(checker.names)),
                    sample_seed=(self.config.seed, step),
                )
            except SkipCheck:
                action = w.unchecked(
                    step,
                    "none",
                    f"the check at step {step} is skipped because training_step returned None "
                    f"there, so there was no loss to check (checks stay on): return the loss from "
                    f"training_step, or pass GradWatch(loss_fn=lambda module, batch: ...)",
                )
            except Exception as exc:
                cause = exc.__cause__ if isinstance(exc.__cause__, NotRerunnable) else exc
                failure = f"{type(cause).__name__}: {cause}"
        seconds = time.perf_counter() - started
        distributed = trainer.world_size > 1
        plan = w.plan_next_check(step, seconds) if distributed else None
        agreed = agree_after_check(
            trainer, list(report.events) if report else [], failure is not None, plan
        )
        if distributed:
            w.agree_next_check(agreed.next_check)
        if agreed.disable:
            action = action.merged(w.disable_checks(step, failure or "on another rank", _FIX))
        events, spent = self._localizer.run(
            lambda: self._rerun.localizer().localize(batch),  # type: ignore[union-attr]
            agreed.events,
            lambda why: w.warn_once(
                "localize",
                f"GradWatch could not localize the failing check at step {step} {why}; its "
                f"events name tensors only",
            ),
            agree=rank_zero_decides(trainer),
        )
        report = with_events(report, events)
        self._act(trainer, action.merged(w.observe_report(report, step, seconds + spent, events)))

    def _act(self, trainer: Trainer, action: Action, *, ended: bool = False) -> None:
        if action.error is not None:
            self._watcher.flush()
            raise action.error
        if action.halt:
            trainer.should_stop = True
            # One line, rank zero, once: gradwatch stopped training, at which step, and why.
            step = _compat.optimizer_step(trainer) - (1 if ended else 0)
            self._watcher.announce_halt(max(0, step), action, ended=ended)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._act(trainer, self._read_rows(trainer))  # the epoch's last steps, before monitors

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        try:
            action = self._read_rows(trainer)
            _, last = self._watcher.flush_health()  # the last, partly filled block
            action = action.merged(agree_action(trainer, last) if self._agree else last)
            # A run with checks enabled in which no check ran is never reported as clean.
            step = max(0, _compat.optimizer_step(trainer) - 1)  # the last step that ran
            self._act(trainer, action.merged(self._watcher.finish_checks(step)), ended=True)
        finally:
            self._watcher.flush()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Training ends with an error: write what was observed (no collective, no action)."""
        try:
            if self._rows:
                rows, self._rows = self._rows, []
                steps, self._row_steps = self._row_steps, []
                self._watcher.observe_norm_rows(steps, self._row_names, self._to_host(rows))
            self._watcher.flush_health()
        except Exception:  # never hide the exception that ended training
            pass
        finally:
            self._watcher.flush()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._watcher.close()
        self._rerun = None

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"watcher": self._watcher.state_dict(), "checks_on": self._watcher.checks_on}
        if self._rows:  # norms still on the device: carried, judged after a resume
            state["device_rows"] = {
                "names": list(self._row_names),
                "steps": list(self._row_steps),
                "norms": torch.stack(self._rows).cpu().double().tolist(),
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        w = self._watcher
        state = dict(state_dict.get("watcher", {}))
        for key in ("next_due", "consecutive_skips"):  # 0.1 kept these beside the watcher's state
            state.setdefault(key, state_dict.get(key))
        state = {k: v for k, v in state.items() if v is not None}
        w.load_state_dict(state)
        rows = state_dict.get("device_rows")
        if rows:
            w.hold_rows(rows["steps"], rows["names"], rows["norms"])
        if self._rerun is not None and self._rerun.trainer.world_size <= 1:
            w.agree_next_check(None)  # a plan agreed by ranks that are not there any more
        # A checkpoint never overrides the constructor or setup: checks stay off if they were
        # switched off in that run, if this callback was built with enable_checks=False, or if
        # setup switched them off (sharded strategies).
        w.checks_on = w.checks_on and bool(state_dict.get("checks_on", True))
