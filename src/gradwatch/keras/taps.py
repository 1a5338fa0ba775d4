"""What gradwatch adds to Keras' train function: per-step norms, the update guard, the capture.

Norms are computed inside the train step from the gradients the optimizer receives (its ``apply``
is wrapped: every train step, the default one or a user's own, hands its gradients to the
optimizer), stored on the device in a ring of :data:`~gradwatch.watch.watcher.HEALTH_BLOCK` rows
(each with its sequence number, the 1-based train-step count) and read once per block.

**Guard**: when ``on_nonfinite`` (or ``on_explode``) halts or raises, the update of a step whose
gradients are non-finite (or above the explode limit) is skipped, as Keras' ``LossScaleOptimizer``
skips one: on TensorFlow inside the graph (``tf.cond``, XLA-safe, no host read — the host halts
when it reads the block); on the torch backend with one boolean host read per step. Gradients are
judged from their norms, never from the loss (oneDNN's ReLU maps NaN to 0, so a finite loss is no
proxy); a float32 sum of squares that overflows is recomputed in float64 inside the graph.

**Capture** keeps the batch of a step a check is due on (:mod:`~gradwatch.keras.capture`): a
``tf.py_function`` inside ``tf.cond``; under ``jit_compile=True`` zero-padded variables of
:data:`CAPACITY` rows per input leaf plus a row count.

Installed at ``on_train_begin``, removed at ``on_train_end`` (the train function is rebuilt both
times). A ``fit`` interrupted before ``on_train_end`` (another callback raising, Ctrl-C) leaves a
sentinel on ``make_train_function``: the next ``fit`` of that model, with or without gradwatch,
removes every wrapper and rebuilds its train function first.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from gradwatch.keras import _compat
from gradwatch.keras.backend import to_numpy
from gradwatch.keras.capture import CAPACITY, BatchCapture
from gradwatch.keras.wrappers import jit_compiled, mark_wrapper, repair
from gradwatch.watch.watcher import HEALTH_BLOCK

__all__ = ["CAPACITY", "Taps", "repair"]


class Taps:
    """The in-graph hooks of one ``fit`` and the host side that reads them."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.capture = BatchCapture()  # the batch of a step a check is due on
        self.urgent = False  # torch backend: this step's update was skipped by the guard
        self._ring: Any = None  # TF: a (HEALTH_BLOCK, n + 1) ring of [norms..., seq]
        self._seq: Any = None  # TF: the in-graph sequence number of the last stored row
        self._torch_rows: list[tuple[int, Any]] = []  # torch: (seq, norm vector) since last read
        self._seen_seq = 0
        self._start_seq = 0
        self._since_read = 0
        self._read_every = HEALTH_BLOCK
        self._rows = HEALTH_BLOCK  # ring rows: a block, or a whole execution if longer
        self._bounds: dict[Any, Any] = {}  # torch: the guard's limits per device
        self.lso = False  # the optimizer is a LossScaleOptimizer (it skips overflows itself)
        self.no_skip: str | None = None  # why the guard cannot skip inside the graph
        self._skip_total: Any = None  # TF: steps skipped by the LSO or the guard, this fit
        self._skip_run: Any = None  # TF: of which the last ones in a row
        self._skipped: Any = None  # TF: whether this step's update was skipped
        self._ours: Any = None  # TF: skipped by the guard (not by a LossScaleOptimizer)
        self._tracking = False  # TF, at trace time: the train step tracks skips
        self._installed: list[tuple[Any, str]] = []
        self._guard = False
        self._explode: float | None = None
        self._jit = False
        self._spe = 1
        self.norms_on = False

    # -- installation --------------------------------------------------------------------------
    def install(
        self,
        model: Any,
        step: int,
        *,
        norms: bool,
        capture: bool,
        guard: bool = False,
        explode: float | None = None,
    ) -> None:
        """Wrap the optimizer's ``apply`` (norms, guard) and ``train_step`` (capture); rebuild.

        Args:
            model: The compiled model.
            step: ``optimizer.iterations`` before the first step.
            norms: Record per-step gradient norms.
            capture: Keep the batch of steps a check is due on.
            guard: Skip the update of a step whose gradients are not finite (or exceed
                ``explode``).
            explode: Gradient RMS above which the guard also skips (``None``: finiteness only).
        """
        self.uninstall(model, rebuild=False)
        repair(model)  # wrappers an interrupted fit left behind
        self.capture.reset()
        self.urgent, self.no_skip = False, None
        self.lso = False
        self._guard, self._explode = guard and norms, explode
        self._jit = keras.backend.backend() == "tensorflow" and jit_compiled(model)
        self._spe = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        if norms:
            self._install_norms(model, step)
        if capture or self._guard or self.lso:
            self._install_train_step(model, capture)
        if self._installed:
            self._install_sentinel(model)
            model.make_train_function(force=True)

    def uninstall(self, model: Any, *, rebuild: bool = True) -> None:
        """Remove every wrapper; the next ``fit`` builds its train function without gradwatch."""
        if not self._installed:
            return
        for obj, name in self._installed:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        self._installed = []
        self._ring = self._seq = self._skipped = None
        self._ours = self._skip_total = self._skip_run = None
        self._bounds = {}
        self.capture.release()
        self.norms_on = False
        if rebuild:
            model.train_function = None
            if hasattr(model, "make_train_function"):
                model.make_train_function(force=True)

    def _install_sentinel(self, model: Any) -> None:
        """``make_train_function`` without ``force`` is how every ``fit`` starts: if gradwatch's
        wrappers are still there, the ``fit`` that installed them was interrupted."""
        original = model.make_train_function
        taps = self

        def make_train_function(force: bool = False) -> Any:
            if not force and taps._installed:
                taps.uninstall(model, rebuild=False)
                repair(model)
                return model.make_train_function(force=True)
            return original(force=force)

        model.make_train_function = mark_wrapper(make_train_function)
        self._installed.append((model, "make_train_function"))

    def _install_norms(self, model: Any, step: int) -> None:
        opt = model.optimizer
        inner = getattr(opt, "inner_optimizer", None) or opt  # LossScaleOptimizer: unscaled grads
        self.lso = inner is not opt
        original = inner.apply
        # Enough rows for a whole execution: no step's row is overwritten before it is read.
        self._rows = max(HEALTH_BLOCK, self._spe)
        self._read_every = max(1, self._rows // self._spe)
        self._seen_seq = self._start_seq = step
        self._since_read = 0
        self._torch_rows = []
        tensorflow = keras.backend.backend() == "tensorflow"
        if tensorflow:
            import tensorflow as tf

            with tf.init_scope():
                self._seq = tf.Variable(
                    tf.constant(step, tf.int64), trainable=False, name="gradwatch_seq"
                )
                self._skip_total = tf.Variable(
                    tf.constant(0, tf.int64), trainable=False, name="gradwatch_skips"
                )
                self._skip_run = tf.Variable(
                    tf.constant(0, tf.int64), trainable=False, name="gradwatch_skip_run"
                )
            if model.trainable_variables:
                self._make_ring(len(model.trainable_variables))
        taps = self

        def apply(grads: Any, trainable_variables: Any = None, *args: Any, **kwargs: Any) -> Any:
            grads = list(grads)
            variables = (
                list(trainable_variables)
                if trainable_variables is not None
                else _compat.optimizer_variables(inner)
            )
            calm = taps.record_norms(grads, variables)
            if calm is None:
                if tensorflow and taps._tracking:
                    taps._skipped.assign(False)  # reached: the LossScaleOptimizer applies it
                return original(grads, trainable_variables, *args, **kwargs)
            if not tensorflow:
                if bool(calm):  # the one host read per step (torch backend)
                    return original(grads, trainable_variables, *args, **kwargs)
                taps.urgent = True
                return None
            import tensorflow as tf

            if not inner.built:  # build outside the cond: no variables created in a branch
                inner.build(variables)

            def step_() -> Any:
                original(grads, trainable_variables, *args, **kwargs)
                return tf.constant(True)

            applied = tf.cond(calm, step_, lambda: tf.constant(False))
            if taps._tracking:
                taps._skipped.assign(tf.logical_not(applied))
                taps._ours.assign(tf.logical_not(applied))
            return None

        inner.apply = mark_wrapper(apply)
        self._installed.append((inner, "apply"))
        self.norms_on = True

    def _make_ring(self, n: int) -> None:
        import tensorflow as tf

        with tf.init_scope():
            self._ring = tf.Variable(
                tf.zeros([self._rows, n + 1], tf.float64), trainable=False, name="gradwatch_norms"
            )

    def record_norms(self, grads: list[Any], variables: list[Any]) -> Any:
        """Called inside the train step (traced on TensorFlow): one reduction, one stored vector.

        Returns whether the step may update (a boolean tensor) when the guard is on, else ``None``.
        """
        self.names = [v.path for v in variables]
        self.shapes = {v.path: tuple(int(d) for d in v.shape) for v in variables}
        if keras.backend.backend() == "tensorflow":
            return self._record_tf(grads, variables)
        return self._record_torch(grads)

    def _limits(self, dtype: Any) -> npt.NDArray[np.float64]:
        """Each tensor's norm limit for the guard (the largest float64 without ``explode``)."""
        top = float(np.finfo(np.float64).max)
        if self._explode is None:
            return np.full(len(self.names), top)
        return np.array(
            [
                min(top, math.sqrt(max(1, math.prod(self.shapes[n]))) * self._explode)
                for n in self.names
            ]
        )

    def _record_tf(self, grads: list[Any], variables: list[Any]) -> Any:
        import tensorflow as tf

        dense: list[Any] = []
        for g, v in zip(grads, variables, strict=False):
            if g is not None and isinstance(g, tf.IndexedSlices):
                if self._jit:  # XLA: a fixed row count (the variable's), repeated rows summed
                    g = tf.math.unsorted_segment_sum(g.values, g.indices, int(v.shape[0]))
                else:
                    unique, inverse = tf.unique(g.indices)
                    g = tf.math.unsorted_segment_sum(g.values, inverse, tf.shape(unique)[0])
            if g is not None and g.dtype in (tf.float16, tf.bfloat16):
                g = tf.cast(g, tf.float32)  # a half-precision sum of squares overflows early
            dense.append(g)
        if not dense:
            return None
        zero32, zero64 = tf.constant(0.0, tf.float32), tf.constant(0.0, tf.float64)
        # Half squared norms with one fused op per tensor (tf.nn.l2_loss), one sqrt for all.
        halves = tf.stack(
            [zero32 if g is None else tf.cast(tf.nn.l2_loss(g), tf.float32) for g in dense]
        )

        def exact() -> Any:  # a float32 sum of squares overflowed (or a gradient is not finite)
            return tf.stack(
                [zero64 if g is None else tf.nn.l2_loss(tf.cast(g, tf.float64)) for g in dense]
            )

        halves64 = tf.cond(
            tf.reduce_all(tf.math.is_finite(halves)), lambda: tf.cast(halves, tf.float64), exact
        )
        stacked = tf.sqrt(2.0 * halves64)
        if self._ring is None or self._ring.shape[1] != len(dense) + 1:
            self._make_ring(len(dense))  # a model built during fit: its variables exist now

        def store() -> Any:
            seq = self._seq.assign_add(1)
            row = tf.concat([stacked, tf.reshape(tf.cast(seq, tf.float64), [1])], 0)
            self._ring.scatter_nd_update(
                tf.reshape(seq % self._rows, [1, 1]), tf.reshape(row, [1, -1])
            )
            return tf.constant(0)

        # Under a distribution strategy every replica calls apply: one row per step, from the
        # first replica.
        context = tf.distribute.get_replica_context()
        replica = 0 if context is None else context.replica_id_in_sync_group
        if isinstance(replica, int):
            if replica == 0:
                store()
        else:
            tf.cond(tf.equal(replica, 0), store, lambda: tf.constant(0))
        if not self._guard:
            return None
        if not tf.__internal__.distribute.strategy_supports_no_merge_call():
            self.no_skip = "its optimizer's merge_call cannot sit inside a replica's tf.cond"
            return None
        return tf.reduce_all(stacked <= tf.constant(self._limits(tf.float64)))

    def _record_torch(self, grads: list[Any]) -> Any:
        import torch

        from gradwatch.torch import _compat as torch_compat

        if not grads:
            return None
        dense = [g.to_dense() if g.is_sparse else g for g in grads if g is not None]
        if not dense:
            return None
        device = dense[0].device
        it = iter(torch_compat.foreach_norm(dense))
        zero = torch.zeros((), device=device)
        stacked = torch.stack(
            [next(it).float().to(device) if g is not None else zero for g in grads]
        ).detach()
        calm: bool | None = None
        if self._guard:
            limits = self._limits(None)
            key = (tuple(self.names), device)
            bound = self._bounds.get(key)
            if bound is None:
                top = torch.finfo(torch.float32).max
                bound = torch.as_tensor(np.minimum(limits, top), dtype=torch.float32).to(device)
                self._bounds[key] = bound
            calm = bool((stacked <= bound).all())  # the one host read per step
            if not calm:  # float32 overflows recomputed in float64; NaN and inf stay
                values = stacked.tolist()
                for i, (g, value) in enumerate(zip(grads, values, strict=True)):
                    if value == math.inf and g is not None:
                        g64 = (g.to_dense() if g.is_sparse else g).detach().double()
                        values[i] = float(torch.linalg.vector_norm(g64))
                stacked = torch.tensor(values, dtype=torch.float64, device=device)
                calm = all(v <= lim for v, lim in zip(values, limits, strict=True))
        last = self._torch_rows[-1][0] if self._torch_rows else self._seen_seq
        self._torch_rows.append((last + 1, stacked))
        del self._torch_rows[: -self._rows]
        return calm

    def _install_train_step(self, model: Any, capture: bool) -> None:
        """Wrap ``train_step``: the capture; and, when an update can be skipped (the guard, or a
        ``LossScaleOptimizer``), the count of skipped steps and the non-trainable state
        (BatchNorm statistics...) put back after a skip — always after the guard's, after the
        scaler's when that state went non-finite."""
        original = model.train_step
        taps = self
        tensorflow = keras.backend.backend() == "tensorflow"
        tensorflow_ring = self._skip_total is not None
        lso = self.lso and tensorflow_ring  # count the scaler's skips (and undo spoiled state)
        track = lso or (self._guard and tensorflow_ring)
        if tensorflow:
            import tensorflow as tf

            with tf.init_scope():
                self.capture.due_var = tf.Variable(False, trainable=False, name="gradwatch_due")
                if track:
                    self._skipped = tf.Variable(False, trainable=False, name="gradwatch_skipped")
                    self._ours = tf.Variable(False, trainable=False, name="gradwatch_guard_skip")

            def train_step(data: Any) -> Any:
                if capture:
                    flat = [tf.convert_to_tensor(t) for t in keras.tree.flatten(data)]
                    cap = taps.capture
                    keep = cap.xla_keep(data, flat) if taps._jit else cap.py_keep(data, flat)
                    if keep is not None:
                        tf.cond(cap.due_var, keep, lambda: tf.constant(0))
                # What a skipped update must not leave behind: the non-trainable float state
                # (read at trace time: a model built during fit has it by now).
                state = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]
                taps._tracking = track and (lso or bool(state))
                if not taps._tracking:
                    return original(data)
                # A LossScaleOptimizer that skips never reaches the wrapped apply: skipped
                # unless apply says otherwise.
                taps._skipped.assign(lso)
                taps._ours.assign(False)
                before = [tf.identity(v.value) for v in state]
                logs = original(data)
                put_back = tf.identity(taps._ours)
                if lso:
                    skipped = tf.identity(taps._skipped)
                    taps._skip_total.assign_add(tf.cast(skipped, tf.int64))
                    taps._skip_run.assign(
                        tf.where(skipped, taps._skip_run + 1, tf.constant(0, tf.int64))
                    )
                    if state:
                        spoiled = tf.logical_not(
                            tf.reduce_all(
                                [tf.reduce_all(tf.math.is_finite(v.value)) for v in state]
                            )
                        )
                        put_back = tf.logical_or(put_back, tf.logical_and(skipped, spoiled))
                if state:

                    def put_state_back() -> Any:
                        for v, value in zip(state, before, strict=True):
                            v.assign(value)
                        return tf.constant(0)

                    tf.cond(put_back, put_state_back, lambda: tf.constant(0))
                return logs
        else:

            def train_step(data: Any) -> Any:
                if taps.capture.due_now:
                    taps.capture.stash = keras.tree.map_structure(
                        lambda t: to_numpy(t) if t is not None else None, data
                    )
                if not taps._guard:
                    return original(data)
                state = list(model.non_trainable_variables)
                before = [keras.ops.copy(v.value) for v in state]
                logs = original(data)
                if taps.urgent:  # the guard skipped this update: put the state back too
                    for v, value in zip(state, before, strict=True):
                        v.assign(value)
                return logs

        model.train_step = mark_wrapper(train_step)
        self._installed.append((model, "train_step"))

    def skip_counts(self) -> tuple[int, int]:
        """``(steps skipped this fit, of which the last ones in a row)`` (TensorFlow; one read)."""
        if self._skip_total is None:
            return 0, 0
        return int(self._skip_total.numpy()), int(self._skip_run.numpy())

    # -- the host side -------------------------------------------------------------------------
    @property
    def due_now(self) -> bool:
        """Whether the coming step's batch is kept for a check."""
        return self.capture.due_now

    @property
    def capped(self) -> tuple[int, int] | None:
        """``(rows kept, batch rows)`` of the last capture when it was trimmed to :data:`CAPACITY`."""
        return self.capture.capped

    @property
    def no_capture(self) -> str | None:
        """Why the XLA-safe capture could not be built (``None``: it could)."""
        return self.capture.no_capture

    def set_due(self, due: bool) -> None:
        """Whether the coming step's batch is kept for a check."""
        self.capture.set_due(due)

    def take_stash(self) -> Any:
        """The captured batch (``None`` if none), forgotten afterwards (:class:`BatchCapture`)."""
        return self.capture.take_stash()

    def step_done(self) -> bool:
        """After a callback call: whether the stored rows must be read now (a block is full, or
        the torch guard skipped an update)."""
        if not self.norms_on:
            return False
        self._since_read += 1
        urgent, self.urgent = self.urgent, False
        return urgent or self._since_read >= self._read_every

    @property
    def unread(self) -> bool:
        """Rows are stored that were not read yet."""
        return self.norms_on and self._since_read > 0

    def drain(self) -> tuple[list[int], npt.NDArray[np.float64]]:
        """Rows stored since the last read, oldest first, with their steps (one device read).

        A row's step is its train-step count (``optimizer.iterations`` after the step, when no
        update was skipped), under any ``steps_per_execution``.
        """
        self._since_read = 0
        if self._seq is not None:  # TensorFlow ring
            if self._ring is None:
                return [], np.zeros((0, len(self.names)))
            buf = np.asarray(self._ring.numpy(), dtype=np.float64)
            seqs, values = buf[:, -1].astype(np.int64), buf[:, :-1]
        else:  # torch: host list of device vectors
            rows, self._torch_rows[:] = list(self._torch_rows), []
            if not rows:
                return [], np.zeros((0, len(self.names)))
            import torch

            seqs = np.array([q for q, _ in rows], dtype=np.int64)
            values = torch.stack([t.double() for _, t in rows]).cpu().numpy()
        fresh = seqs > self._seen_seq
        if not fresh.any():
            return [], values[:0]
        order = np.argsort(seqs[fresh])
        seqs, values = seqs[fresh][order], values[fresh][order]
        self._seen_seq = int(seqs[-1])
        return seqs.tolist(), values[:, : len(self.names)]
