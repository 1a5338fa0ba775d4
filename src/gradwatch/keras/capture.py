"""The capture: the live batch of a step a check is due on, kept from inside the train step.

On TensorFlow a ``tf.py_function`` inside ``tf.cond`` hands the batch to the host; under
``jit_compile=True`` (XLA cannot compile a ``py_function``) the batch goes into zero-padded
variables of :data:`CAPACITY` rows per input leaf plus a row count, read by the host after the
step. On the torch backend the train step stashes the batch on the host itself. The
:class:`~gradwatch.keras.taps.Taps` of a ``fit`` own one :class:`BatchCapture`.
"""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["CAPACITY", "BatchCapture"]

#: Rows of a batch the XLA-safe capture keeps (a larger batch is checked on its first rows).
CAPACITY = 64


class BatchCapture:
    """The batch kept for a check, and the in-graph state that keeps it.

    Example:
        >>> capture = BatchCapture()
        >>> capture.stash = {"x": [1.0]}
        >>> capture.take_stash(), capture.take_stash()
        ({'x': [1.0]}, None)
    """

    def __init__(self) -> None:
        self.stash: Any = None
        self.due_now = False
        self.capped: tuple[int, int] | None = None  # (rows kept, batch rows) of a trimmed capture
        self.no_capture: str | None = None  # why the XLA-safe capture could not be built
        self.due_var: Any = None  # TF: whether the coming step's batch is kept
        self._slots: list[Any] = []  # XLA capture: one padded variable per input leaf
        self._rows_var: Any = None
        self._structure: Any = None

    def reset(self) -> None:
        """A new ``fit``: nothing kept, nothing due."""
        self.stash, self.due_now, self.capped, self.no_capture = None, False, None, None

    def release(self) -> None:
        """Forget the in-graph variables (the train function is rebuilt without them)."""
        self.due_var = self._rows_var = None
        self._slots = []

    def py_keep(self, data: Any, flat: list[Any]) -> Any:
        """The batch to the host through ``tf.py_function`` (exact; not XLA-compilable)."""
        import tensorflow as tf

        capture = self

        def keep() -> Any:
            def to_host(*arrays: Any) -> int:
                capture.stash = keras.tree.pack_sequence_as(data, [a.numpy() for a in arrays])
                return 0

            return tf.py_function(to_host, flat, Tout=tf.int32)

        return keep

    def xla_keep(self, data: Any, flat: list[Any]) -> Any:
        """The batch into zero-padded ``[CAPACITY, ...]`` variables and a row count (XLA-safe).

        Returns ``None`` (no capture; the check is skipped with a warning) when an input leaf has
        no fixed per-row shape.
        """
        import tensorflow as tf

        if not flat or any(t.shape.rank is None or t.shape.rank < 1 for t in flat):
            self.no_capture = "an input without a batch dimension"
            return None
        if any(d is None for t in flat for d in t.shape[1:]):
            self.no_capture = "an input whose per-row shape varies (padded variables need one)"
            return None
        if len(self._slots) != len(flat):
            with tf.init_scope():
                self._slots = [
                    tf.Variable(
                        tf.zeros([CAPACITY, *t.shape[1:]], t.dtype),
                        trainable=False,
                        name=f"gradwatch_batch_{i}",
                    )
                    for i, t in enumerate(flat)
                ]
                self._rows_var = tf.Variable([0, 0], trainable=False, name="gradwatch_rows")
        self._structure = data
        slots, rows_var = self._slots, self._rows_var

        def keep() -> Any:
            total = tf.shape(flat[0])[0]
            n = tf.minimum(total, CAPACITY)
            for var, t in zip(slots, flat, strict=True):
                head = t[:CAPACITY]
                pad = [[0, CAPACITY - n]] + [[0, 0]] * (t.shape.rank - 1)
                var.assign(tf.ensure_shape(tf.pad(head, pad), var.shape))
            rows_var.assign(tf.stack([n, total]))
            return tf.constant(0)

        return keep

    def set_due(self, due: bool) -> None:
        """Whether the coming step's batch is kept for a check."""
        if due != self.due_now:
            self.due_now = due
            if self.due_var is not None:
                self.due_var.assign(due)

    def take_stash(self) -> Any:
        """The captured batch (``None`` if none), forgotten afterwards.

        Under XLA the padded variables are read (their first ``rows`` rows); :attr:`capped` then
        says whether the batch was larger than :data:`CAPACITY`.
        """
        if self._slots and self._rows_var is not None and self._structure is not None:
            n, total = (int(x) for x in self._rows_var.numpy())
            self._rows_var.assign([0, 0])
            if n == 0:
                return None
            self.capped = (n, total) if total > n else None
            values = [v.numpy()[:n] for v in self._slots]
            return keras.tree.pack_sequence_as(self._structure, values)
        stash, self.stash = self.stash, None
        return stash
