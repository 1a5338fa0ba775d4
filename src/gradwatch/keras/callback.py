"""``GradWatch`` for ``model.fit``: hooks only — hook -> watcher -> act.

In-graph norms and the live-batch capture are :mod:`~gradwatch.keras.taps`; checks are
:class:`~gradwatch.keras.checker.KerasChecker`; everything written goes through the watcher to a
:class:`~gradwatch.watch.sinks.TensorBoardSink` under ``<log_dir>/gradwatch`` and the JSON-lines
file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from gradwatch.core.policy import Action
from gradwatch.keras.backend import to_numpy, variable_norms
from gradwatch.keras.checker import (
    KerasChecker,
    check_probe_data,
    check_probe_shapes,
    probe_batch,
)
from gradwatch.keras.localize import KerasLocalizer
from gradwatch.keras.taps import Taps
from gradwatch.localization import LocalizationReport
from gradwatch.options import (
    DType,
    Mode,
    Policy,
    WatchConfig,
    check_path,
    check_selection,
    compile_patterns,
)
from gradwatch.report import CheckReport
from gradwatch.watch.localizing import FailureLocalizer, with_events
from gradwatch.watch.sinks import Sink, TensorBoardSink, require_tensorboard
from gradwatch.watch.watcher import Watcher, WatchRecords

__all__ = ["GradWatch"]

#: Norm blocks between two reads of the weights' norms (the relative vanishing rule's scale).
_WEIGHT_EVERY = 8


class GradWatch(WatchRecords, keras.callbacks.Callback):  # type: ignore[misc]
    """Gradient checks and gradient-health monitoring for ``model.fit``.

    Same arguments as :class:`gradwatch.lightning.GradWatch` (see ``docs/keras.md``), plus:

    Args:
        data: Probe data — ``(x, y)`` / ``(x, y, sample_weight)`` arrays, a ``tf.data.Dataset`` or
            a ``keras.utils.PyDataset`` (its first batch is used). Without it the callback checks
            the live training batches (TensorFlow and torch backends).
        log_dir: TensorBoard summaries go to ``<log_dir>/gradwatch``; ``None`` writes none.
        loss_fn: ``loss_fn(model, data) -> scalar`` to check instead of the compiled loss, with
            ``data`` as ``train_step`` receives it (the same meaning as the Lightning callback's
            ``loss_fn``): for a model with its own ``train_step``. Evaluated in float64 like the
            compiled loss. A model that overrides ``train_step`` without it gets one warning at
            ``on_train_begin`` (the compiled loss is checked instead; with none, no check runs).

    Raises:
        ValueError: At construction, a bad argument (the message names it, the allowed values
            and the value given). At ``on_train_begin``: an uncompiled model, probe data that
            does not fit the model, ``include``/``exclude`` matching no trainable variable of a
            model built before ``fit`` (one built during ``fit`` is judged at its first check).
        ModuleNotFoundError: ``log_dir`` given without the ``tensorboard`` package; the message
            names the extra that installs it (``pip install "gradwatch[tensorboard]"``).

    Example:
        >>> cb = GradWatch(check_every_n_steps=10, on_explode="halt")
        >>> cb.get_config()["check_every_n_steps"]
        10
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
        data: Any = None,
        log_dir: str | None = None,
        loss_fn: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = WatchConfig.from_arguments(locals())
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, data), got {loss_fn!r}")
        self.loss_fn = loss_fn
        check_probe_data(data)
        log_dir = check_path("log_dir", log_dir)
        if log_dir is not None:
            require_tensorboard("log_dir")
        self.data = data
        self.log_dir = log_dir
        self._watcher = Watcher(self.config, first_step=1, framework="keras")
        self._taps = Taps()
        self._checker: KerasChecker | None = None
        self._localizer: KerasLocalizer | None = None
        self._failures = FailureLocalizer(self.config.max_overhead)
        self._probe: tuple[Any, Any, Any] | None = None
        self._step = 0
        self._epoch_base = 0
        self._blocks_read = 0
        self._t_start = 0.0
        self._last_norm: float | None = None
        self._last_error: float | None = None
        self._selection_pending = False

    @property
    def localizations(self) -> list[LocalizationReport]:
        """The latest localizations: one per failing check that was localized (at most 16).

        When a check fails, the layer whose own backward is wrong is looked for on the same batch
        (:func:`gradwatch.keras.localize`): the first failing check always,
        later ones while localizing stays within ``max_overhead``. The culprit is named in the
        check's ``mismatch``/``disconnected`` events (``module`` and the message).
        """
        return self._failures.reports

    @property
    def skipped_steps(self) -> int:
        """Steps a ``LossScaleOptimizer`` skipped (overflowing gradients under ``mixed_float16``)."""
        return self._watcher.skipped_steps

    def get_config(self) -> dict[str, Any]:
        config = self.config.to_dict()
        config.update(data=None, log_dir=self.log_dir, loss_fn=None)
        return config

    # -- installation --------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        backend = keras.backend.backend()
        w = self._watcher
        w.reset()  # each fit starts fresh, as keras.callbacks.EarlyStopping does
        if not model.compiled or model.optimizer is None:
            raise ValueError("GradWatch needs a compiled model (model.compile(optimizer, loss))")
        # A model built during fit is judged at its first step (an unchecked event, not an error).
        self._selection_pending = w.checks_on and not model.built
        if w.checks_on and model.built:
            self._check_selection()
        self._step = int(to_numpy(model.optimizer.iterations))
        self._last_norm = self._last_error = None
        self._checker = None
        self._localizer = None
        self._failures = FailureLocalizer(self.config.max_overhead)
        sinks: list[Sink] = [TensorBoardSink(f"{self.log_dir}/gradwatch")] if self.log_dir else []
        w.open(sinks, log_every=50)
        w.start({v.path: tuple(v.shape) for v in model.trainable_variables})
        self._probe = None
        if self.data is not None and w.checks_on:
            x, y, sw = probe_batch(self.data)
            check_probe_shapes(model, x)
            self._probe = (x, y, sw)
        if w.checks_on and self._probe is None and backend == "jax":
            raise ValueError(
                "GradWatch on the JAX backend cannot see the training batches (values leave the "
                "jitted step only through its logs): pass data=(x, y) probe data, or "
                "enable_checks=False"
            )
        norms = self.config.enable_norms and backend in ("tensorflow", "torch")
        if self.config.enable_norms and not norms:
            w.warn_once(
                "norms-backend",
                f"GradWatch: per-step gradient norms are not available on the {backend} backend "
                f"yet; checks go on",
            )
        c = self.config
        self._taps.install(
            model,
            self._step,
            norms=norms,
            capture=w.checks_on and self._probe is None,
            guard=c.stops("on_nonfinite") or c.stops("on_explode"),
            explode=c.explode_threshold if c.stops("on_explode") else None,
        )
        self._epoch_base = self._step
        self._blocks_read = 0
        if w.checks_on and self.loss_fn is None:
            self._act(self._judge_train_step(model))

    def _check_selection(self) -> None:
        """``ValueError`` when ``include``/``exclude`` select none of the trainable variables
        (``mode="modules"``: none of the layers, by path)."""
        names = [v.path for v in self.model.trainable_variables if "float" in str(v.dtype)]
        if self.config.mode == "modules":
            from gradwatch.keras.localize import layer_tree

            names = [n for n, _ in layer_tree(self.model)]
        check_selection(
            names,
            compile_patterns("include", self.config.include),
            compile_patterns("exclude", self.config.exclude),
            what="layer" if self.config.mode == "modules" else "variable",
        )

    def _judge_selection(self, step: int) -> Action:
        """The selection of a model built during fit, at its first step: unchecked if empty."""
        self._selection_pending = False
        try:
            self._check_selection()
        except ValueError as exc:
            w = self._watcher
            w.checks_on = False
            return w.unchecked(
                step,
                "selection",
                f"{exc} in the model built during fit, so checks are switched off for this run "
                f"(norms go on): pass include/exclude patterns that match its variable paths",
            )
        return Action()

    def _judge_train_step(self, model: Any) -> Action:
        """One message when the model has its own ``train_step`` and no ``loss_fn`` was given:
        a warning that the compiled loss is checked instead, or (with none) the ``unchecked``
        event saying no check can run."""
        owner = _train_step_owner(model)
        if owner is None:
            return Action()
        fix = (
            "pass GradWatch(loss_fn=lambda model, data: <the scalar loss train_step computes>), "
            "data as train_step receives it"
        )
        if getattr(model, "loss", None) is None:
            self._watcher.checks_on = False  # the unchecked event is the only message about it
            return self._watcher.unchecked(
                self._step,
                "train-step",
                f"{owner} overrides train_step and the model has no compiled loss, so no "
                f"gradient check can run (norms are still recorded): {fix}",
            )
        self._watcher.warn_once(
            "train-step",
            f"GradWatch: {owner} overrides train_step; checks use the compiled loss "
            f"({_loss_name(model.loss)}), not what {owner}.train_step computes (norms are "
            f"recorded from the gradients it applies): to check train_step's own loss, {fix}",
        )
        return Action()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        action = self._catch_up(final=True)
        # A run with checks enabled in which no check ran is never reported as clean.
        action = action.merged(self._watcher.finish_checks(self._step))
        # A halt judged at the very end has nothing left to stop: its line says so.
        self._watcher.announce_halt(self._step, action, ended=True)
        try:
            self._act(Action(error=action.error))  # nothing left to halt
        finally:
            self._taps.uninstall(self.model)
            self._watcher.flush()

    # -- per step ------------------------------------------------------------------------------
    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_base = self._step

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._t_start = time.perf_counter()
        # Under steps_per_execution one call covers several steps: due if any of them is.
        spe = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        w = self._watcher
        self._taps.set_due(any(w.check_due(self._step + k) for k in range(1, spe + 1)))

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        train_seconds = time.perf_counter() - self._t_start
        # The train-step count after this call (optimizer.iterations when no update was skipped):
        # under steps_per_execution Keras calls back once per execution with its last step.
        # Keras reports a short last execution as if it were whole: cap at the epoch's steps.
        steps = (self.params or {}).get("steps")
        done = batch + 1 if not steps else min(batch + 1, int(steps))
        self._step = max(self._step + 1, self._epoch_base + done)
        step = self._step
        action = self._observe_norms() if self._taps.step_done() else Action()
        if self._selection_pending and self.model.built:
            action = action.merged(self._judge_selection(step))
        if self._taps.due_now and self._watcher.checks_on:
            action = action.merged(self._check(step))
        self._watcher.record_step(train_seconds)
        self._failures.record_step(train_seconds)
        self._fill_logs(logs)
        self._act(action)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._act(self._catch_up(final=False))  # the epoch's last steps
        self._fill_logs(logs)

    def _fill_logs(self, logs: dict[str, Any] | None) -> None:
        if logs is not None:
            if self._last_norm is not None:
                logs["gradwatch_grad_norm"] = self._last_norm
            if self._last_error is not None:
                logs["gradwatch_rel_error"] = self._last_error

    def _catch_up(self, *, final: bool) -> Action:
        """Judge the norm rows not yet read (and, when ``final``, the last partial block)."""
        action = self._observe_norms() if self._taps.unread else Action()
        if final:
            action = action.merged(self._watcher.flush_health()[1])
        return action

    def _observe_norms(self) -> Action:
        steps, values = self._taps.drain()
        w = self._watcher
        if self._taps.shapes and set(self._taps.shapes) != set(w.shapes):
            w.start(self._taps.shapes)  # a model built during fit: its variables exist now
        action = self._observe_skips(steps[-1] if steps else self._step)
        # Rows of steps the health rules do not sample (norm_every_n_steps) are dropped, except
        # non-finite or exploding ones: an update the guard skipped is never lost.
        limit = self._watcher.explode_limits(self._taps.names)
        calm = np.asarray((values <= limit).all(axis=1), dtype=bool).reshape(-1)
        loud = [not bool(x) for x in calm] if len(self._taps.names) else []
        keep = [i for i, s in enumerate(steps) if w.observes(s) or (loud and loud[i])]
        if not keep or not self._taps.names:
            return action
        if self._blocks_read % _WEIGHT_EVERY == 0:
            self._observe_weights()
        self._blocks_read += 1
        _, rows = w.observe_norm_rows([steps[i] for i in keep], self._taps.names, values[keep])
        self._last_norm = float(np.sqrt(np.sum(values[keep[-1]] ** 2)))
        if self._taps.no_skip:
            w.warn_once(
                "no-skip",
                f"GradWatch: under this distribution strategy the update of a step with "
                f"non-finite gradients cannot be skipped inside the graph "
                f"({self._taps.no_skip}); fit halts after it",
            )
        return action.merged(rows)

    def _observe_weights(self) -> None:
        """The weights' norms for the relative vanishing rule, from the host: at the first block
        and every :data:`_WEIGHT_EVERY` blocks after (weights move slowly; one read of all the
        variables costs about a millisecond on a small model)."""
        variables = [v for v in self.model.trainable_variables if v.path in self._taps.shapes]
        norms = variable_norms(variables)
        self._watcher.observe_weight_norms(
            {v.path: float(x) for v, x in zip(variables, norms, strict=True)}
        )

    def _observe_skips(self, step: int) -> Action:
        """Steps a ``LossScaleOptimizer`` skipped (overflow): counted; a run of them is an event."""
        if not self._taps.lso:
            return Action()
        total, run = self._taps.skip_counts()
        opt = self.model.optimizer
        scale = float(to_numpy(getattr(opt, "dynamic_scale", 1.0)))
        return self._watcher.observe_skip_run(step, total, run, scale, "LossScaleOptimizer")

    def _act(self, action: Action) -> None:
        """Raise (sinks flushed, wrappers removed first) or halt."""
        if action.error is not None:
            self._taps.uninstall(self.model)
            self._watcher.flush()
            raise action.error
        if action.halt:
            self.model.stop_training = True
            # One line, once: gradwatch stopped training, at which step, and why.
            self._watcher.announce_halt(self._step, action)

    def _check(self, step: int) -> Action:
        w = self._watcher
        started = time.perf_counter()
        batch = self._probe if self._probe is not None else self._taps.take_stash()
        if batch is None:
            action = Action()
            if self._taps.no_capture:
                action = w.unchecked(
                    step,
                    "no-capture",
                    f"checks are skipped because under jit_compile=True the training batch cannot "
                    f"be kept for a check ({self._taps.no_capture}): pass data=(x, y) probe data, "
                    f"or compile with jit_compile=False",
                )
            return action
        if self._taps.capped:
            kept, total = self._taps.capped
            w.warn_once(
                "capped",
                f"GradWatch: under jit_compile=True checks use the first {kept} rows of batches "
                f"of {total} (the XLA-safe batch capture holds {kept} rows)",
            )
        batch = tuple(batch) if isinstance(batch, list) else batch
        x, y, sw = keras.utils.unpack_x_y_sample_weight(batch)
        report = None
        live = False
        try:
            model = self.model  # on JAX, Callback.model syncs the variables out of the jitted state
            if self._checker is None or self._checker.model is not model:
                self._checker = KerasChecker(
                    model, loss_fn=self.loss_fn, **self.config.check_arguments
                )
            live = self._probe is None and self.loss_fn is not None
            report = self._checker.check(
                x,
                y,
                sw,
                data=batch if live else None,  # loss_fn gets the batch as train_step got it
                step=step,
                tensors=w.tensors_for_check(len(self._checker.names)),
                sample_seed=(self.config.seed, step),
            )
        except Exception as exc:
            action = w.disable_checks(
                step,
                f"{type(exc).__name__}: {exc}",
                "run gradwatch.keras.check_gradients(model, x, y) on one batch to see the whole "
                "error, pass data=(x, y) probe data the model accepts, or pass enable_checks=False",
            )
            return action.merged(w.observe_report(None, step, time.perf_counter() - started))
        if report is not None:
            self._last_error = report.max_rel_error
            report = self._localize_failure(report, step, x, y, sw, batch if live else None)
        return w.observe_report(report, step, time.perf_counter() - started)

    def _localize_failure(
        self, report: CheckReport, step: int, x: Any, y: Any, sw: Any, data: Any
    ) -> CheckReport:
        """The report with the culprit named in its failing events, when due and found."""

        def run() -> LocalizationReport:
            model = self.model
            if self._localizer is None or self._localizer.model is not model:
                self._localizer = KerasLocalizer(model, loss_fn=self.loss_fn, seed=self.config.seed)
            return self._localizer.localize(x, y, sw, data=data)

        events, _ = self._failures.run(
            run,
            list(report.events),
            lambda why: self._watcher.warn_once(
                "localize",
                f"GradWatch could not localize the failing check at step {step} {why}; its "
                f"events name variables only",
            ),
        )
        return with_events(report, events) or report


def _train_step_owner(model: Any) -> str | None:
    """The name of the user class that defines ``train_step`` (``None``: Keras' own)."""
    for cls in type(model).__mro__:
        if "train_step" in vars(cls):
            return None if cls.__module__.split(".")[0] == "keras" else cls.__qualname__
    return None


def _loss_name(loss: Any) -> str:
    if isinstance(loss, str):
        return repr(loss)
    return str(
        getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__
    )
