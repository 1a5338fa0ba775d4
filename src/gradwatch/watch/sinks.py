"""Where records go: the :class:`Sink` protocol and its framework-free writers.

The :class:`~gradwatch.watch.watcher.Watcher` is the only caller: it decides what is written,
when, and on which rank, and hands every record to each of its sinks. A sink only formats.

* :class:`JsonlSink`: one JSON record per line — ``{"type": "meta", "run", ...}``,
  ``{"type": "norms", "run", "step", "values": {param: norm}, "global"}``,
  ``{"type": "report", "run", "step", "report": CheckReport.to_dict()}``,
  ``{"type": "event", "run", "step", "event": GradientEvent.to_dict()}``,
  ``{"type": "schedule", "run", "step", "text"}``.
* :class:`TensorBoardSink`: TensorBoard event files, no TensorFlow needed.
* Lightning's loggers: :class:`gradwatch.lightning.sinks.LoggersSink`.

Runs: the meta record opens a run and carries its id (``meta["run"]``, see
:meth:`Watcher.meta <gradwatch.watch.watcher.Watcher.meta>`); every record after it belongs to that
run. :class:`JsonlSink` copies the id into each record, since several runs may append to one file;
TensorBoard has it in the meta text only (its runs are told apart by file and folder).

Both files are readable by ``gradwatch inspect``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from gradwatch.report import CheckReport, GradientEvent, json_float
from gradwatch.watch import tags

__all__ = ["JsonlSink", "Sink", "TensorBoardSink", "require_tensorboard"]

#: What installs the package :class:`TensorBoardSink` writes with.
TENSORBOARD_EXTRA = 'pip install "gradwatch[tensorboard]"'


def require_tensorboard(argument: str) -> None:
    """``ModuleNotFoundError`` naming the extra to install when ``tensorboard`` is missing.

    Called where an argument asks for TensorBoard files (Keras ``log_dir``), so the user learns
    at construction rather than at the first write. The package is looked up, not imported.

    Example:
        >>> require_tensorboard("log_dir")  # installed here: nothing happens
    """
    if importlib.util.find_spec("tensorboard") is None:
        raise ModuleNotFoundError(
            f"{argument} asks for TensorBoard files, which need the tensorboard package: "
            f"{TENSORBOARD_EXTRA} (or pass {argument}=None)",
            name="tensorboard",
        )


@runtime_checkable
class Sink(Protocol):
    """What the watcher writes through. Every method is called on the writing rank only.

    To add a sink, implement these nine methods (a no-op is fine where a record has no place)
    and pass it to :meth:`Watcher.open <gradwatch.watch.watcher.Watcher.open>`. A sink may also
    say ``wants_histograms = False``: the watcher then spares the host copies of the gradients.
    """

    def write_meta(self, step: int, meta: Mapping[str, Any]) -> None:
        """The run's id (``meta["run"]``), shapes and thresholds, once, before any other record."""
        ...

    def write_norms(self, step: int, norms: Mapping[str, float], global_norm: float) -> None:
        """Per-tensor gradient L2 norms of one optimizer step, and their global norm."""
        ...

    def write_histograms(self, step: int, values: Mapping[str, npt.ArrayLike]) -> None:
        """Gradient values per tensor (finite ones), at the logging period."""
        ...

    def write_report(self, report: CheckReport) -> None:
        """One check's report (its events arrive through :meth:`write_event`)."""
        ...

    def write_event(self, event: GradientEvent) -> None:
        """One event."""
        ...

    def write_event_counts(self, step: int, counts: Mapping[str, int]) -> None:
        """After the events of a step: the run's count so far of each kind that had one there."""
        ...

    def write_schedule(self, step: int, text: str) -> None:
        """After a check: when the next one is due and why."""
        ...

    def flush(self) -> None:
        """Push what was written to disk (before a raise, at the end of training)."""
        ...

    def close(self) -> None:
        """Release files; a later write may reopen."""
        ...


class JsonlSink:
    """Appends records to a JSON-lines file, opened lazily on the first write.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "gw.jsonl")
        >>> sink = JsonlSink(path)
        >>> sink.write_norms(1, {"w": 0.5}, 0.5); sink.close()
        >>> open(path).read().count("\\n")
        1
    """

    wants_histograms = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh: IO[str] | None = None
        #: The id of the run being written (from the last meta record), copied into every record.
        self.run: str | None = None

    def _write(self, kind: str, fields: Mapping[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")
        record = {"type": kind, "run": self.run} if self.run is not None else {"type": kind}
        record.update(fields)
        self._fh.write(json.dumps(record, allow_nan=False) + "\n")

    def write_meta(self, step: int, meta: Mapping[str, Any]) -> None:
        """The run's meta record (id, shapes, thresholds); the id goes into every later record."""
        run = meta.get("run")
        self.run = None if run is None else str(run)
        self._write("meta", meta)

    def write_norms(self, step: int, norms: Mapping[str, float], global_norm: float) -> None:
        """One norms record."""
        self._write(
            "norms",
            {
                "step": int(step),
                "values": {k: json_float(v) for k, v in norms.items()},
                "global": json_float(global_norm),
            },
        )

    def write_histograms(self, step: int, values: Mapping[str, npt.ArrayLike]) -> None:
        """Histograms have no place in the JSON lines."""
        return None

    def write_report(self, report: CheckReport) -> None:
        """One report record."""
        self._write("report", {"step": report.step, "report": report.to_dict()})

    def write_schedule(self, step: int, text: str) -> None:
        """One schedule record: when the next check is due and why."""
        self._write("schedule", {"step": int(step), "text": text})

    def write_event(self, event: GradientEvent) -> None:
        """One event record."""
        self._write("event", {"step": event.step, "event": event.to_dict()})

    def write_event_counts(self, step: int, counts: Mapping[str, int]) -> None:
        """Nothing: the event records themselves are the count."""
        return None

    def flush(self) -> None:
        """Flush to disk."""
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        """Close the file (a later write reopens it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class TensorBoardSink:
    """TensorBoard event files without TensorFlow: TF2-style tensor summaries, created lazily.

    Scalars and texts are written as ``tf.summary`` writes them (tensor summaries with the
    ``scalars`` / ``text`` plugin), histograms as classic ``HistogramProto`` values; TensorBoard
    and ``gradwatch inspect`` read both. No file exists until the first write.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> sink = TensorBoardSink(d)
        >>> os.listdir(d)
        []
        >>> sink.scalars(1, {"gradwatch/grad_norm/global": 0.5}); sink.close()
        >>> any("tfevents" in f for f in os.listdir(d))
        True
    """

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        self.logdir = str(logdir)
        self._writer: Any = None

    def _emit(self, step: int, values: list[Any]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if self._writer is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            Path(self.logdir).mkdir(parents=True, exist_ok=True)
            self._writer = EventFileWriter(self.logdir)
        import time

        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)

    # -- the Sink protocol ---------------------------------------------------------------------
    def write_meta(self, step: int, meta: Mapping[str, Any]) -> None:
        """Meta (the run id among it) as a text summary, and the custom-scalars layout."""
        self.text(tags.META_TAG, json.dumps(dict(meta)), step)
        self.layout()

    def write_norms(self, step: int, norms: Mapping[str, float], global_norm: float) -> None:
        """Norm scalars."""
        self.scalars(step, tags.norm_scalars(norms, global_norm))

    def write_histograms(self, step: int, values: Mapping[str, npt.ArrayLike]) -> None:
        """One histogram per tensor."""
        for name, arr in values.items():
            self.histogram(tags.hist_tag(name), arr, step)

    def write_report(self, report: CheckReport) -> None:
        """Worst relative error per checked tensor, and the maximum."""
        self.scalars(report.step or 0, tags.report_scalars(report))

    def write_event(self, event: GradientEvent) -> None:
        """The event's JSON as a text summary."""
        self.text(tags.EVENTS_TAG, tags.event_text(event), event.step)

    def write_event_counts(self, step: int, counts: Mapping[str, int]) -> None:
        """Running counts as scalars ``gradwatch/events/<kind>``."""
        self.scalars(step, tags.event_count_scalars(counts))

    def write_schedule(self, step: int, text: str) -> None:
        """The schedule decision as a text summary."""
        self.text(tags.SCHEDULE_TAG, text, step)

    # -- summaries -------------------------------------------------------------------------------
    def layout(self) -> None:
        """The custom-scalars layout (all layers' norms in one chart, errors in another)."""
        summary = tags.custom_scalars_layout()
        self._emit(0, list(summary.value))

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Scalar tensor summaries, one per tag."""
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        values = [
            summary_pb2.Summary.Value(
                tag=tag,
                metadata=meta,
                tensor=tensor_pb2.TensorProto(
                    dtype=types_pb2.DT_FLOAT,
                    tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                    float_val=[float(v)],
                ),
            )
            for tag, v in scalars.items()
        ]
        if values:
            self._emit(step, values)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text summary."""
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        )
        value = summary_pb2.Summary.Value(
            tag=tag,
            metadata=meta,
            tensor=tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                string_val=[text.encode("utf-8")],
            ),
        )
        self._emit(step, [value])

    def histogram(self, tag: str, values: npt.ArrayLike, step: int, bins: int = 30) -> None:
        """A histogram of finite values (non-finite ones are left out)."""
        from tensorboard.compat.proto import summary_pb2

        arr = np.asarray(values, dtype=np.float64).ravel()
        arr = arr[np.isfinite(arr)]
        if arr.size == 0:
            return
        counts, edges = np.histogram(arr, bins=bins)
        histo = summary_pb2.HistogramProto(
            min=float(arr.min()),
            max=float(arr.max()),
            num=float(arr.size),
            sum=float(arr.sum()),
            sum_squares=float(np.dot(arr, arr)),
            bucket_limit=[float(x) for x in edges[1:]],
            bucket=[float(c) for c in counts],
        )
        self._emit(step, [summary_pb2.Summary.Value(tag=tag, histo=histo)])

    def flush(self) -> None:
        """Flush to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the file (a later write opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
