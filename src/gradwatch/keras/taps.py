"""What gradwatch adds to Keras' train function: per-step norms and the live-batch capture.

Norms are computed inside the train step from the gradients the optimizer receives (its ``apply``
is wrapped: every train step, the default one or a user's own, hands its gradients to the
optimizer), stored on the device in a ring of :data:`~gradwatch.watch.watcher.HEALTH_BLOCK` rows
(each with its sequence number) and read once per block — at once when the step's gradients are
not finite (an in-graph flag read every step: oneDNN's ReLU maps NaN to 0, so a finite loss is no
proxy). The capture keeps the batch of a step a check is due on (TensorFlow: a ``tf.py_function``
inside ``tf.cond``). Installed at ``on_train_begin``, removed at ``on_train_end`` (the train
function is rebuilt both times).
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from gradwatch.keras import _compat
from gradwatch.keras.backend import to_numpy
from gradwatch.watch.watcher import HEALTH_BLOCK

__all__ = ["Taps"]


class Taps:
    """The in-graph hooks of one ``fit`` and the host side that reads them."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.stash: Any = None
        self.due_now = False
        self._ring: Any = None  # TF: a (HEALTH_BLOCK, n + 1) ring of [norms..., seq]
        self._seq: Any = None  # TF: the in-graph sequence number of the last stored row
        self._finite: Any = None  # TF: whether the last stored row is finite
        self._torch_rows: list[tuple[int, Any]] = []  # torch: (seq, norm vector) since last read
        self._seen_seq = 0
        self._since_read = 0
        self._read_every = HEALTH_BLOCK
        self._last_row_only = False
        self._due_var: Any = None
        self._installed: list[tuple[Any, str]] = []
        self.norms_on = False

    # -- installation --------------------------------------------------------------------------
    def install(self, model: Any, step: int, *, norms: bool, capture: bool) -> None:
        """Wrap the optimizer's ``apply`` (norms) and ``train_step`` (capture); rebuild the step."""
        self.uninstall(model, rebuild=False)
        self.stash, self.due_now = None, False
        if norms:
            self._install_norms(model, step)
        if capture:
            self._install_capture(model)
        if self._installed:
            model.make_train_function(force=True)

    def uninstall(self, model: Any, *, rebuild: bool = True) -> None:
        """Remove every wrapper; the next ``fit`` builds its train function without gradwatch."""
        if not self._installed:
            return
        for obj, name in self._installed:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        self._installed = []
        self._ring = self._seq = self._finite = self._due_var = None
        self.norms_on = False
        if rebuild:
            model.train_function = None
            if hasattr(model, "make_train_function"):
                model.make_train_function(force=True)

    def _install_norms(self, model: Any, step: int) -> None:
        opt = model.optimizer
        inner = getattr(opt, "inner_optimizer", None) or opt  # LossScaleOptimizer: unscaled grads
        original = inner.apply
        n = len(model.trainable_variables)
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        self._last_row_only = spe > 1  # one callback call per execution: its last step
        self._read_every = 1 if spe > 1 else HEALTH_BLOCK
        self._seen_seq = step
        self._since_read = 0
        self._torch_rows = []
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            with tf.init_scope():
                self._ring = tf.Variable(
                    tf.zeros([HEALTH_BLOCK, n + 1], tf.float64),
                    trainable=False,
                    name="gradwatch_norms",
                )
                self._seq = tf.Variable(
                    tf.constant(step, tf.int64), trainable=False, name="gradwatch_seq"
                )
                self._finite = tf.Variable(True, trainable=False, name="gradwatch_finite")
        taps = self

        def apply(grads: Any, trainable_variables: Any = None, *args: Any, **kwargs: Any) -> Any:
            grads = list(grads)
            variables = (
                list(trainable_variables)
                if trainable_variables is not None
                else _compat.optimizer_variables(inner)
            )
            taps.record_norms(grads, variables)
            return original(grads, trainable_variables, *args, **kwargs)

        inner.apply = apply
        self._installed.append((inner, "apply"))
        self.norms_on = True

    def record_norms(self, grads: list[Any], variables: list[Any]) -> None:
        """Called inside the train step (traced on TensorFlow): one reduction, one stored vector."""
        self.names = [v.path for v in variables]
        if keras.backend.backend() == "tensorflow":
            self._record_tf(grads)
        else:
            self._record_torch(grads)

    def _record_tf(self, grads: list[Any]) -> None:
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
        if self._ring.shape[1] != stacked.shape[0] + 1:
            return

        def store() -> Any:
            seq = self._seq.assign_add(1)
            self._finite.assign(tf.reduce_all(tf.math.is_finite(stacked)))
            row = tf.concat([stacked, tf.reshape(tf.cast(seq, tf.float64), [1])], 0)
            self._ring.scatter_nd_update(
                tf.reshape(seq % HEALTH_BLOCK, [1, 1]), tf.reshape(row, [1, -1])
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

    def _record_torch(self, grads: list[Any]) -> None:
        import torch

        from gradwatch.torch import _compat as torch_compat

        dense = [g for g in grads if g is not None]
        norms = (
            torch_compat.foreach_norm([g.to_dense() if g.is_sparse else g for g in dense])
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
        taps = self
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            with tf.init_scope():
                self._due_var = tf.Variable(False, trainable=False, name="gradwatch_due")

            def train_step(data: Any) -> Any:
                flat = [tf.convert_to_tensor(t) for t in keras.tree.flatten(data)]

                def stash() -> Any:
                    def keep(*arrays: Any) -> int:
                        values = [a.numpy() for a in arrays]
                        taps.stash = keras.tree.pack_sequence_as(data, values)
                        return 0

                    return tf.py_function(keep, flat, Tout=tf.int32)

                tf.cond(taps._due_var, stash, lambda: tf.constant(0))
                return original(data)
        else:

            def train_step(data: Any) -> Any:
                if taps.due_now:
                    taps.stash = keras.tree.map_structure(
                        lambda t: to_numpy(t) if t is not None else None, data
                    )
                return original(data)

        model.train_step = train_step
        self._installed.append((model, "train_step"))

    # -- the host side -------------------------------------------------------------------------
    def set_due(self, due: bool) -> None:
        """Whether the coming step's batch is kept for a check."""
        if due != self.due_now:
            self.due_now = due
            if self._due_var is not None:
                self._due_var.assign(due)

    def take_stash(self) -> Any:
        """The captured batch (``None`` if none), forgotten afterwards."""
        stash, self.stash = self.stash, None
        return stash

    def step_done(self, urgent: bool) -> bool:
        """After a step: whether the stored rows must be read now (a block is full, or ``urgent``,
        or the step's gradients are not finite)."""
        if not self.norms_on:
            return False
        self._since_read += 1
        if not urgent and self._finite is not None:
            urgent = not bool(self._finite.value().numpy())
        return urgent or self._since_read >= self._read_every

    @property
    def unread(self) -> bool:
        """Rows are stored that were not read yet."""
        return self.norms_on and self._since_read > 0

    def drain(self, step: int) -> tuple[list[int], npt.NDArray[np.float64]]:
        """Rows stored since the last read, oldest first, with their steps (one device read)."""
        self._since_read = 0
        if self._seq is not None:  # TensorFlow ring
            buf = np.asarray(self._ring.numpy(), dtype=np.float64)
            seqs, values = buf[:, -1].astype(np.int64), buf[:, :-1]
        else:  # torch: host list of device vectors
            rows, self._torch_rows[:] = list(self._torch_rows), []
            if not rows:
                return [], np.zeros((0, len(self.names)))
            import torch

            seqs = np.array([q for q, _ in rows], dtype=np.int64)
            values = torch.stack([t for _, t in rows]).cpu().numpy().astype(np.float64)
        fresh = seqs > self._seen_seq
        if not fresh.any():
            return [], values[:0]
        order = np.argsort(seqs[fresh])
        seqs, values = seqs[fresh][order], values[fresh][order]
        self._seen_seq = int(seqs[-1])
        values = values[:, : len(self.names)]
        if self._last_row_only:
            return [step], values[-1:]
        return seqs.tolist(), values
