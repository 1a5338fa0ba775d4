"""``GradWatch`` for ``model.fit``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from gradwatch.core.policy import Action
from gradwatch.keras.backend import to_numpy
from gradwatch.keras.checker import KerasChecker
from gradwatch.options import WatchConfig
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch import tags
from gradwatch.watch.sinks import TensorBoardSink
from gradwatch.watch.watcher import HEALTH_BLOCK, Watcher, WatchRecords, global_norm

__all__ = ["GradWatch"]

logger = logging.getLogger("gradwatch")


def _probe_batch(data: Any) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` from arrays, a ``tf.data.Dataset`` or a ``keras.utils.PyDataset``."""
    if isinstance(data, keras.utils.PyDataset):
        item = data[0]
    elif type(data).__name__.endswith("Dataset") and hasattr(data, "take"):
        item = next(iter(data.take(1)))
    elif isinstance(data, (tuple, list)):
        item = tuple(data)
    else:
        item = (data,)
    if not isinstance(item, (tuple, list)):
        item = (item,)
    item = tuple(item) + (None,) * (3 - len(item))
    if len(item) > 3:
        raise ValueError(
            f"data must be (x, y) or (x, y, sample_weight), got a tuple of {len(item)} items"
        )
    return item[0], item[1], item[2]


def _check_shapes(model: Any, x: Any) -> None:
    """``ValueError`` naming the expected and given shapes when probe inputs cannot fit the model."""
    expected = getattr(model, "input_shape", None)
    if expected is None or isinstance(x, Mapping):
        return
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    exp = list(expected) if isinstance(expected, list) else [expected]
    if len(xs) != len(exp):
        raise ValueError(f"data= has {len(xs)} inputs but the model expects {len(exp)}")
    for given, want in zip(xs, exp, strict=True):
        shape = tuple(np.shape(given))
        if want is None:
            continue
        want_t = tuple(want)
        if len(shape) != len(want_t) or any(
            w is not None and w != s for w, s in zip(want_t[1:], shape[1:], strict=False)
        ):
            raise ValueError(
                f"data= does not fit the model: expected inputs of shape {want_t}, got {shape}"
            )


class GradWatch(WatchRecords, keras.callbacks.Callback):  # type: ignore[misc]
    """Gradient checks and gradient-health monitoring for ``model.fit``.

    Same arguments as :class:`gradwatch.lightning.GradWatch` (see ``docs/keras.md``), plus:

    Args:
        data: Probe data — ``(x, y)`` / ``(x, y, sample_weight)`` arrays, a ``tf.data.Dataset`` or
            a ``keras.utils.PyDataset`` (its first batch is used). Without it the callback checks
            the live training batches (TensorFlow and torch backends).
        log_dir: TensorBoard summaries go to ``<log_dir>/gradwatch``; ``None`` writes none.

    Example:
        >>> cb = GradWatch(check_every_n_steps=10, on_explode="halt")
        >>> cb.get_config()["check_every_n_steps"]
        10
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
        data: Any = None,
        log_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.config = WatchConfig.from_arguments(locals())
        if log_dir is not None and not isinstance(log_dir, str):
            log_dir = str(log_dir)
        self.data = data
        self.log_dir = log_dir
        self._watcher = Watcher(self.config)
        self._sink = TensorBoardSink(f"{log_dir}/gradwatch") if log_dir else None
        self._checker: KerasChecker | None = None
        self._checks_on = self.config.enable_checks
        self._probe: tuple[Any, Any, Any] | None = None
        self._stash: tuple[Any, Any, Any] | None = None
        self._norm_names: list[str] = []
        self._norm_source: Any = None  # TF: a (HEALTH_BLOCK, n + 1) ring of [norms..., seq]
        self._norm_seq: Any = None  # TF: the in-graph sequence number of the last stored row
        self._finite: Any = None  # TF: whether the last stored row is finite (read every step)
        self._torch_rows: list[tuple[int, Any]] = []  # torch: (seq, norm vector) since last read
        self._seen_seq = 0
        self._since_read = 0
        self._read_every = 1
        self._last_row_only = False
        self._due_var: Any = None
        self._due_now = False
        self._installed: list[tuple[Any, str]] = []
        self._step = 0
        self._t_start = 0.0
        self._last_norm: float | None = None
        self._last_error: float | None = None
        self._warned: set[str] = set()
        self._log_every = self.config.log_every_n_steps or 50

    # -- records -------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        config = self.config.to_dict()
        config.update(data=None, log_dir=self.log_dir)
        return config

    # -- installation --------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        backend = keras.backend.backend()
        self._due_now = False
        self._stash = None
        self._step = int(to_numpy(model.optimizer.iterations)) if model.optimizer else 0
        shapes = {w.path: tuple(w.shape) for w in model.trainable_variables}
        self._watcher.start(shapes)
        if self.data is not None and self._checks_on:
            x, y, sw = _probe_batch(self.data)
            _check_shapes(model, x)
            self._probe = (x, y, sw)
        if self._checks_on and self._probe is None and backend == "jax":
            raise ValueError(
                "GradWatch on the JAX backend cannot see the training batches (values leave the "
                "jitted step only through its logs): pass data=(x, y) probe data, or "
                "enable_checks=False"
            )
        if not model.compiled or model.optimizer is None:
            raise ValueError("GradWatch needs a compiled model (model.compile(optimizer, loss))")
        if self.config.enable_norms and backend in ("tensorflow", "torch"):
            self._install_norms(model)
        elif self.config.enable_norms:
            self._warn_once(
                "norms-backend",
                f"GradWatch: per-step gradient norms are not available on the {backend} backend "
                f"yet; checks go on",
            )
        if self._checks_on and self._probe is None:
            self._install_capture(model)
        if self._installed:
            model.make_train_function(force=True)

    def _install_norms(self, model: Any) -> None:
        opt = model.optimizer
        inner = getattr(opt, "inner_optimizer", None) or opt  # LossScaleOptimizer: unscaled grads
        original = inner.apply
        backend = keras.backend.backend()
        n = len(model.trainable_variables)
        # Norms stay on the device and are read every HEALTH_BLOCK steps (each row carries its
        # sequence number, starting from the optimizer step), not one device read per step.
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        self._last_row_only = spe > 1  # one callback call per execution: its last step
        self._read_every = 1 if spe > 1 else HEALTH_BLOCK
        self._seen_seq = self._step
        self._since_read = 0
        self._torch_rows = []
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.init_scope():
                self._norm_source = tf.Variable(
                    tf.zeros([HEALTH_BLOCK, n + 1], tf.float64),
                    trainable=False,
                    name="gradwatch_norms",
                )
                self._norm_seq = tf.Variable(
                    tf.constant(self._step, tf.int64), trainable=False, name="gradwatch_seq"
                )
                self._finite = tf.Variable(True, trainable=False, name="gradwatch_finite")
        else:
            self._norm_source = self._torch_rows  # read through _drain_norms

        callback = self

        def apply(grads: Any, trainable_variables: Any = None, *args: Any, **kwargs: Any) -> Any:
            grads = list(grads)
            variables = (
                list(trainable_variables)
                if trainable_variables is not None
                else list(inner._trainable_variables)
            )
            callback._record_norms(grads, variables)
            return original(grads, trainable_variables, *args, **kwargs)

        inner.apply = apply
        self._installed.append((inner, "apply"))

    def _record_norms(self, grads: list[Any], variables: list[Any]) -> None:
        """Called inside the train step (traced on TensorFlow): one reduction, one stored vector."""
        self._norm_names = [v.path for v in variables]
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            # Half squared norms with one fused op per tensor (tf.nn.l2_loss), one sqrt for all.
            halves = []
            for g in grads:
                if g is None:
                    halves.append(tf.constant(0.0, tf.float32))
                    continue
                if isinstance(g, tf.IndexedSlices):
                    unique, inverse = tf.unique(g.indices)
                    g = tf.math.unsorted_segment_sum(g.values, inverse, tf.shape(unique)[0])
                if g.dtype in (tf.float16, tf.bfloat16):
                    g = tf.cast(g, tf.float32)  # a half-precision sum of squares overflows early
                halves.append(tf.cast(tf.nn.l2_loss(g), tf.float32))
            stacked = tf.sqrt(2.0 * tf.cast(tf.stack(halves), tf.float64))
            if self._norm_source.shape[1] != stacked.shape[0] + 1:
                return

            def store() -> Any:
                seq = self._norm_seq.assign_add(1)
                # Read on the host every step: a non-finite gradient can come with a finite loss
                # (oneDNN's ReLU maps NaN to 0), so the loss is no proxy.
                self._finite.assign(tf.reduce_all(tf.math.is_finite(stacked)))
                row = tf.concat([stacked, tf.reshape(tf.cast(seq, tf.float64), [1])], 0)
                self._norm_source.scatter_nd_update(
                    tf.reshape(seq % HEALTH_BLOCK, [1, 1]), tf.reshape(row, [1, -1])
                )
                return tf.constant(0)

            # Under a distribution strategy every replica calls apply: one row per step, from
            # the first replica.
            context = tf.distribute.get_replica_context()
            replica = 0 if context is None else context.replica_id_in_sync_group
            if isinstance(replica, int):
                if replica == 0:
                    store()
            else:
                tf.cond(tf.equal(replica, 0), store, lambda: tf.constant(0))
        else:
            import torch

            dense = [g for g in grads if g is not None]
            norms = (
                torch._foreach_norm([g.to_dense() if g.is_sparse else g for g in dense])
                if dense
                else []
            )
            it = iter(norms)
            if grads:
                stacked = torch.stack(
                    [next(it).float() if g is not None else torch.zeros(()) for g in grads]
                ).detach()
                last = self._torch_rows[-1][0] if self._torch_rows else self._seen_seq
                self._torch_rows.append((last + 1, stacked))
                del self._torch_rows[:-HEALTH_BLOCK]

    def _install_capture(self, model: Any) -> None:
        original = model.train_step
        backend = keras.backend.backend()
        callback = self
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.init_scope():
                self._due_var = tf.Variable(False, trainable=False, name="gradwatch_due")

            def train_step(data: Any) -> Any:
                flat = [tf.convert_to_tensor(t) for t in keras.tree.flatten(data)]

                def stash() -> Any:
                    def keep(*arrays: Any) -> int:
                        values = [a.numpy() for a in arrays]
                        callback._stash = keras.tree.pack_sequence_as(data, values)
                        return 0

                    return tf.py_function(keep, flat, Tout=tf.int32)

                tf.cond(callback._due_var, stash, lambda: tf.constant(0))
                return original(data)
        else:

            def train_step(data: Any) -> Any:
                if callback._due_now:
                    callback._stash = keras.tree.map_structure(
                        lambda t: to_numpy(t) if t is not None else None, data
                    )
                return original(data)

        model.train_step = train_step
        self._installed.append((model, "train_step"))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        events, action = self._catch_up(final=True)
        try:
            self._after(events, Action(error=action.error))  # nothing left to halt
        finally:
            self._uninstall()
            self._flush()

    def _catch_up(self, *, final: bool) -> tuple[list[GradientEvent], Action]:
        """Judge the norm rows not yet read (and, when ``final``, the last partial block)."""
        events: list[GradientEvent] = []
        action = Action()
        if self._norm_source is not None and self._since_read:
            events, action = self._observe_norms(self._step)
        if final:
            more, last = self._watcher.flush_health()
            events, action = events + more, action.merged(last)
        return events, action

    def _uninstall(self) -> None:
        if not self._installed:
            return
        for obj, name in self._installed:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        self._installed = []
        self._norm_source = self._norm_seq = self._finite = None
        self.model.train_function = None  # rebuilt by the next fit, without gradwatch
        if hasattr(self.model, "make_train_function"):
            self.model.make_train_function(force=True)

    def _flush(self) -> None:
        self._watcher.flush()
        if self._sink is not None:
            self._sink.flush()

    # -- per step ------------------------------------------------------------------------------
    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._t_start = time.perf_counter()
        due = self._checks_on and self._watcher.schedule.due(self._step)
        if due != self._due_now:
            self._due_now = due
            if self._due_var is not None:
                self._due_var.assign(due)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        train_seconds = time.perf_counter() - self._t_start
        self._step += 1
        step = self._step  # optimizer.iterations after the update, as keras.callbacks.TensorBoard
        meta = self._watcher.meta_once()
        if meta is not None and self._sink is not None:
            self._sink.text(tags.META_TAG, json.dumps(meta), step)
            self._sink.layout()
        action = Action()
        events: list[GradientEvent] = []
        if self._norm_source is not None:
            self._since_read += 1
            # A non-finite loss in the logs (already on the host) means: read and judge now.
            urgent = logs is not None and any(
                isinstance(x, float) and not math.isfinite(x) for x in logs.values()
            )
            if self._finite is not None and not urgent:
                urgent = not bool(self._finite.numpy())
            if urgent or self._since_read >= self._read_every:
                events, action = self._observe_norms(step)
        if self._due_now:
            report = self._run_check(step)
            if report is not None:
                sub = self._watcher.observe_report(report)
                action = action.merged(sub)
                events += list(report.events)
                self._last_error = report.max_rel_error
                if self._sink is not None:
                    self._sink.scalars(step, tags.report_scalars(report))
        self._watcher.schedule.record_step(train_seconds)
        if logs is not None:
            if self._last_norm is not None:
                logs["gradwatch_grad_norm"] = self._last_norm
            if self._last_error is not None:
                logs["gradwatch_rel_error"] = self._last_error
        self._after(events, action)

    def _after(self, events: Sequence[GradientEvent], action: Action) -> None:
        """Write the events, then act: raise (writers flushed first) or halt."""
        if self._sink is not None:
            for e in events:
                self._sink.text(tags.EVENTS_TAG, tags.event_text(e), e.step)
        if action.error is not None:
            self._uninstall()
            self._flush()
            raise action.error
        if action.halt:
            self.model.stop_training = True

    def _drain_norms(self, step: int) -> tuple[list[int], np.ndarray[Any, Any]]:
        """Rows stored since the last read, oldest first, with their steps (one device read)."""
        self._since_read = 0
        if self._norm_seq is not None:  # TensorFlow ring
            buf = np.asarray(self._norm_source.numpy(), dtype=np.float64)
            seqs, values = buf[:, -1].astype(np.int64), buf[:, :-1]
        else:  # torch: host list of device vectors
            rows, self._torch_rows[:] = list(self._torch_rows), []
            if not rows:
                return [], np.zeros((0, len(self._norm_names)))
            import torch

            seqs = np.array([q for q, _ in rows], dtype=np.int64)
            values = torch.stack([t for _, t in rows]).cpu().numpy().astype(np.float64)
        fresh = seqs > self._seen_seq
        if not fresh.any():
            return [], values[:0]
        order = np.argsort(seqs[fresh])
        seqs, values = seqs[fresh][order], values[fresh][order]
        self._seen_seq = int(seqs[-1])
        if self._last_row_only:
            return [step], values[-1:]
        return seqs.tolist(), values

    def _observe_norms(self, step: int) -> tuple[list[GradientEvent], Action]:
        steps, values = self._drain_norms(step)
        every = self.config.norm_every_n_steps
        keep = [i for i, s in enumerate(steps) if (s - 1) % every == 0]
        if not keep or not self._norm_names:
            return [], Action()
        steps = [steps[i] for i in keep]
        values = values[keep][:, : len(self._norm_names)]
        write = [(s - 1) % self._log_every == 0 for s in steps]
        events, action = self._watcher.observe_norm_rows(
            steps, self._norm_names, values, write=write
        )
        self._last_norm = float(np.sqrt(np.sum(values[-1] ** 2)))
        if self._sink is not None:
            for i, w in enumerate(write):
                if w:
                    norms = dict(zip(self._norm_names, values[i].tolist(), strict=True))
                    self._sink.scalars(steps[i], tags.norm_scalars(norms, global_norm(norms)))
        return events, action

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._after(*self._catch_up(final=False))  # the epoch's last steps
        if logs is not None:
            if self._last_norm is not None:
                logs["gradwatch_grad_norm"] = self._last_norm
            if self._last_error is not None:
                logs["gradwatch_rel_error"] = self._last_error

    def _run_check(self, step: int) -> CheckReport | None:
        started = time.perf_counter()
        batch = self._probe if self._probe is not None else self._stash
        self._stash = None
        if batch is None:
            return None
        x, y, sw = keras.utils.unpack_x_y_sample_weight(
            tuple(batch) if isinstance(batch, list) else batch
        )
        report = None
        try:
            model = self.model  # on JAX, Callback.model syncs the variables out of the jitted state
            if self._checker is None or self._checker.model is not model:
                self._checker = KerasChecker(
                    model,
                    num_params=self.config.num_params,
                    mode=self.config.mode,
                    dtype=self.config.dtype,
                    eps=self.config.eps,
                    rtol=self.config.rtol,
                    seed=self.config.seed,
                    include=self.config.include,
                    exclude=self.config.exclude,
                )
            report = self._checker.check(
                x,
                y,
                sw,
                step=step,
                tensors=self._watcher.tensors_for_check(len(self._checker.names)),
                sample_seed=(self.config.seed, step),
            )
        except Exception as exc:
            self._checks_on = False
            self._warn_once(
                "check-error",
                f"GradWatch: the gradient check at step {step} failed ({type(exc).__name__}: {exc}); "
                f"checks are switched off, norms go on",
            )
        self._watcher.schedule.record_check(time.perf_counter() - started)
        decision = self._watcher.schedule_decision(step)
        if self._sink is not None:
            self._sink.text(tags.SCHEDULE_TAG, decision, step)
        return report
