"""Read gradwatch logs back: TensorBoard event files and JSON lines -> records.

``load(path)`` walks a run folder or a tree of runs (Lightning ``version_*``, Keras ``gradwatch/``),
reading TensorBoard event files — simple scalars (torch's ``SummaryWriter``) and TF2 tensor
summaries (``tf.summary``) alike — gradwatch JSON-lines files and Lightning ``CSVLogger`` files
(``metrics.csv``: one column per tag, rows holding only some columns, in any step order). Every
record is kept (no reservoir thinning). A file or run that gives nothing is reported with a
:class:`SkippedInput` warning saying why. Event files are scanned record by record from memory-mapped bytes, and only
records that can carry gradient data are parsed, which makes the reader several times faster than
TensorBoard's ``EventAccumulator`` (``benchmarks/inspect_speed.py``). Records are read back
through :mod:`gradwatch.report`'s ``from_dict`` and the tag vocabulary of :mod:`gradwatch.watch.tags`.

Norms from logs gradwatch did not write (Lightning's ``grad_norm`` utility, tags
``grad_2.0_norm/<param>``) are recognised, and the health rules are applied to them after the fact.

A CSV has no event texts, only the running count of each kind (``gradwatch/events/<kind>``):
those counts are kept (:attr:`RunData.event_counts`), so a CSV run with failures is not clean, and
:meth:`RunData.undetailed_counts` says how many events have no details in the logs read.

Runs: gradwatch 0.2 gives every training run an id (``run`` in each JSON-lines record and in the
meta text of TensorBoard files; a meta record opens a run, and what follows belongs to it). A folder
whose records carry at most one run id is one run, named by the folder, as before. A folder holding
several (a second ``fit`` appending to the same ``jsonl_path``, two Keras ``fit`` calls writing to
one ``log_dir``) gives one run per id, named ``<folder>#<run id>``, in the order they were written;
records with no id there (0.1 logs, other tools' ``grad_norm`` scalars) form one more run, named by
the folder.

Example:
    >>> parse_grad_norm_tag("grad_2.0_norm/layer.weight")
    'layer.weight'
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import json
import math
import mmap
import os
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.core.finite_diff import tolerances_for
from gradwatch.core.health import HealthMonitor, HealthThresholds
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch import tags

__all__ = [
    "InspectError",
    "RunData",
    "SkippedInput",
    "judge_foreign",
    "load",
    "parse_grad_norm_tag",
]

_FOREIGN_NORM = re.compile(r"^grad_(?:[0-9.]+|inf)_norm(?:/(.+)|_total)$")
_MARKERS = (b"gradwatch/", b"grad_")
_HEADER = struct.Struct("<QI")


class InspectError(Exception):
    """A usage or input problem: one clear line for the user, exit status 2."""


class SkippedInput(UserWarning):
    """A file or run under the inspected path gave no gradient data; the message says why."""


def _skip(what: str, why: str) -> None:
    text = f"skipped {what}: {why}".replace("\n", " ")
    warnings.warn(text, SkippedInput, stacklevel=3)


def parse_grad_norm_tag(tag: str) -> str | None:
    """Parameter of a Lightning ``grad_norm`` tag (``"global"`` for the total), else ``None``.

    Example:
        >>> parse_grad_norm_tag("grad_2.0_norm_total"), parse_grad_norm_tag("train_loss")
        ('global', None)
    """
    m = _FOREIGN_NORM.match(tag)
    if m is None:
        return None
    name = m.group(1) or tags.GLOBAL_NAME
    for suffix in ("_step", "_epoch"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


@dataclass
class RunData:
    """Everything read for one run.

    Attributes:
        name: Path of the run folder relative to the inspected path (``"."`` for the path itself),
            followed by ``#<run id>`` when the folder holds several runs.
        norms: Parameter → ``{step: gradient L2 norm}`` (``"global"`` included).
        rel_errors: Parameter → ``{step: worst relative error}`` (``"max"`` included).
        events: Recorded events, or, for foreign norms, events found by the health rules.
        meta: Shapes and thresholds written by gradwatch, if any.
        foreign: Norms came from logs gradwatch did not write.
        run_id: The id gradwatch gave the run (``None`` for 0.1 and foreign logs).
        event_counts: Kind → the highest running count of ``gradwatch/events/<kind>`` scalars
            (the only trace of events in a CSV log).
    """

    name: str
    norms: dict[str, dict[int, float]] = field(default_factory=dict)
    rel_errors: dict[str, dict[int, float]] = field(default_factory=dict)
    events: list[GradientEvent] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    foreign: bool = False
    run_id: str | None = None
    event_counts: dict[str, int] = field(default_factory=dict)

    @property
    def rtol(self) -> float:
        """The tolerance the run's checks were judged against (the float64 default if unknown)."""
        return float(self.meta.get("rtol", tolerances_for("float64").rtol))

    @property
    def vanish_threshold(self) -> float:
        """The run's vanishing threshold (the callbacks' default if unknown)."""
        return float(self.meta.get("vanish_threshold", HealthThresholds.vanish_threshold))

    @property
    def explode_threshold(self) -> float:
        """The run's exploding threshold (the callbacks' default if unknown)."""
        return float(self.meta.get("explode_threshold", HealthThresholds.explode_threshold))

    @property
    def has_data(self) -> bool:
        return bool(self.norms or self.rel_errors or self.events or self.event_counts)

    def kind_counts(self) -> dict[str, int]:
        """Events per kind: the recorded events, or the count scalars where they say more.

        Example:
            >>> RunData("r", event_counts={"mismatch": 2}).kind_counts()
            {'mismatch': 2}
        """
        counts: dict[str, int] = {}
        for e in self.events:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        for kind, n in self.event_counts.items():
            counts[kind] = max(counts.get(kind, 0), n)
        return counts

    def undetailed_counts(self) -> dict[str, int]:
        """Events per kind that the count scalars report but no event record describes."""
        recorded: dict[str, int] = {}
        for e in self.events:
            recorded[e.kind] = recorded.get(e.kind, 0) + 1
        return {
            kind: n - recorded.get(kind, 0)
            for kind, n in self.event_counts.items()
            if n > recorded.get(kind, 0)
        }

    def add_report(self, report: CheckReport) -> None:
        """The worst relative error per tensor (and the maximum) of one check."""
        step = report.step if report.step is not None else -1
        for name, value in report.worst_by_param().items():
            series = self.rel_errors.setdefault(name, {})
            series[step] = max(series.get(step, 0.0), value)
        if report.max_rel_error is not None:
            self.rel_errors.setdefault(tags.MAX_NAME, {})[step] = report.max_rel_error

    def add_event(self, event: GradientEvent) -> None:
        key = (event.step, event.kind, event.param, event.message)
        if all((e.step, e.kind, e.param, e.message) != key for e in self.events[-64:]):
            self.events.append(event)

    def absorb(self, other: RunData) -> None:
        """Take in the records of ``other``, written after this run's (its meta wins)."""
        for target, source in ((self.norms, other.norms), (self.rel_errors, other.rel_errors)):
            for name, series in source.items():
                target.setdefault(name, {}).update(series)
        for event in other.events:
            self.add_event(event)
        for kind, n in other.event_counts.items():
            self.event_counts[kind] = max(self.event_counts.get(kind, 0), n)
        self.meta.update(other.meta)
        self.foreign = self.foreign or other.foreign
        self.run_id = self.run_id or other.run_id


class _Runs:
    """The runs of one folder, keyed by run id (``None``: records without one), in written order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.by_id: dict[str | None, RunData] = {}

    def get(self, run_id: Any) -> RunData:
        key = None if run_id is None else str(run_id)
        data = self.by_id.get(key)
        if data is None:
            data = self.by_id[key] = RunData(name=self.name, run_id=key)
        return data

    def runs(self) -> list[RunData]:
        """One run when at most one id was seen (as 0.1 read it); else one per id."""
        ids = [k for k in self.by_id if k is not None]
        if len(ids) <= 1:
            merged, *rest = self.by_id.values() or [RunData(name=self.name)]
            for data in rest:  # in written order
                merged.absorb(data)
            return [merged]
        for run_id, data in self.by_id.items():
            if run_id is not None:
                data.name = f"{self.name}#{run_id}"
        return list(self.by_id.values())


# -- reading ------------------------------------------------------------------------------------


def _iter_records(path: Path) -> Iterator[bytes]:
    """Payloads of a TFRecord file that may carry gradient data; warns and stops on damage."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        off = 0
        while off < size:
            if off + 12 > size:
                warnings.warn(
                    f"{path}: truncated record at byte {off}; the rest is skipped", stacklevel=4
                )
                return
            length, _ = _HEADER.unpack_from(buf, off)
            end = off + 12 + length
            if end + 4 > size:
                warnings.warn(
                    f"{path}: truncated or damaged record at byte {off}; the rest is skipped",
                    stacklevel=4,
                )
                return
            payload = buf[off + 12 : end]
            off = end + 4
            if any(m in payload for m in _MARKERS):
                yield payload


def _tensor_value(tensor: Any) -> Any:
    if tensor.string_val:
        return tensor.string_val[0].decode("utf-8", "replace")
    if tensor.float_val:
        return float(tensor.float_val[0])
    if tensor.double_val:
        return float(tensor.double_val[0])
    from tensorboard.util import tensor_util

    arr = tensor_util.make_ndarray(tensor)
    return arr.reshape(-1)[0].item() if arr.size else None


def _read_event_file(path: Path, runs: _Runs) -> str | None:
    """Read one event file into ``runs``; returns why it gave nothing (``None``: it gave data)."""
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError as exc:  # pragma: no cover - the inspect extra brings it
        raise InspectError(
            "reading TensorBoard files needs: pip install 'gradwatch[inspect]'"
        ) from exc
    from google.protobuf.message import DecodeError

    run = runs.get(None)  # until a meta text names the run
    taken = 0
    try:
        for payload in _iter_records(path):
            try:
                event = event_pb2.Event.FromString(payload)
            except DecodeError:
                warnings.warn(f"{path}: a damaged record was skipped", stacklevel=3)
                continue
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    taken += _add_scalar(run, value.tag, int(event.step), float(value.simple_value))
                elif kind == "tensor":
                    data = _tensor_value(value.tensor)
                    if isinstance(data, str):
                        run, took = _add_text(runs, run, value.tag, data, path)
                        taken += took
                    elif data is not None:
                        taken += _add_scalar(run, value.tag, int(event.step), float(data))
    except (OSError, ValueError) as exc:
        return f"cannot be read ({exc})"
    return None if taken else "no gradwatch or grad_norm data in it"


def _add_scalar(run: RunData, tag: str, step: int, value: float) -> bool:
    """Add one scalar if it is gradient data; returns whether it was."""
    if tag.startswith(tags.NORM_PREFIX):
        run.norms.setdefault(tag[len(tags.NORM_PREFIX) :], {})[step] = value
    elif tag.startswith(tags.REL_ERROR_PREFIX):
        run.rel_errors.setdefault(tag[len(tags.REL_ERROR_PREFIX) :], {})[step] = value
    elif tag.startswith(tags.EVENT_COUNT_PREFIX):
        # Running counts per kind: the highest is the run's count (texts, where written, say more).
        kind = tag[len(tags.EVENT_COUNT_PREFIX) :]
        if kind and math.isfinite(value):
            run.event_counts[kind] = max(run.event_counts.get(kind, 0), round(value))
    else:
        name = parse_grad_norm_tag(tag)
        if name is None:
            return False
        run.foreign = True
        run.norms.setdefault(name, {})[step] = value
    return True


def _add_text(runs: _Runs, run: RunData, tag: str, text: str, path: Path) -> tuple[RunData, bool]:
    """Add one text summary; returns the run that the file's next records belong to, and
    whether the text was an event."""
    if tag.startswith(tags.EVENTS_TAG):
        try:
            run.add_event(GradientEvent.from_dict(json.loads(text)))
            return run, True
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}: an unreadable event text was skipped", stacklevel=4)
    elif tag.startswith(tags.META_TAG):
        with contextlib.suppress(ValueError, TypeError):
            meta = dict(json.loads(text))
            if meta.get("run") is not None:  # a meta text opens a run
                run = runs.get(meta["run"])
            run.meta.update(meta)
    return run, False


def _read_jsonl(path: Path, runs: _Runs) -> str | None:
    """Read one JSON-lines file into ``runs``; returns why it gave nothing (``None``: data)."""
    taken = 0
    bad: list[int] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    kind = rec.get("type")
                    if not isinstance(kind, str):
                        raise ValueError("no record type")
                    run = runs.get(rec.get("run"))
                    if kind == "norms":
                        step = int(rec["step"])
                        for name, v in rec["values"].items():
                            run.norms.setdefault(name, {})[step] = float(v)
                        run.norms.setdefault(tags.GLOBAL_NAME, {})[step] = float(rec["global"])
                    elif kind == "report":
                        run.add_report(CheckReport.from_dict(rec["report"]))
                    elif kind == "event":
                        run.add_event(GradientEvent.from_dict(rec["event"]))
                    elif kind == "meta":
                        run.meta.update({k: v for k, v in rec.items() if k != "type"})
                    taken += kind in ("norms", "report", "event")
                except (ValueError, KeyError, TypeError, AttributeError):
                    bad.append(lineno)
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot be read ({exc})"
    if not taken:
        return "no gradwatch records in it" if bad else "empty"
    if bad:
        where = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        warnings.warn(
            f"{path}: {len(bad)} line(s) are not gradwatch records and were skipped (line {where})",
            stacklevel=3,
        )
    return None


def _csv_float(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _read_csv(path: Path, runs: _Runs) -> str | None:
    """Read a Lightning ``CSVLogger`` file (``metrics.csv``); returns why it gave nothing.

    One column per tag and a ``step`` column; a row holds only the columns logged together, and
    rows need not be in step order (gradwatch writes its norms in blocks).
    """
    run = runs.get(None)  # a CSV carries no run id
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                return "empty"
            wanted = [
                (i, col)
                for i, col in enumerate(header)
                if col.startswith(tags.PREFIX + "/") or parse_grad_norm_tag(col) is not None
            ]
            if not wanted:
                return "no gradwatch or grad_norm columns (not a gradwatch CSVLogger file)"
            if "step" not in header:
                return "gradwatch columns but no 'step' column"
            step_at = header.index("step")
            taken = 0
            for row in reader:
                step = _csv_float(row[step_at]) if step_at < len(row) else None
                if step is None:
                    continue
                for i, col in wanted:
                    value = _csv_float(row[i]) if i < len(row) else None
                    if value is not None:
                        taken += _add_scalar(run, col, int(step), value)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return f"cannot be read ({exc})"
    return None if taken else "gradwatch columns but no values"


def _is_event_file(name: str) -> bool:
    return "tfevents" in name


def _is_log_file(name: str) -> bool:
    return _is_event_file(name) or name.endswith((".jsonl", ".csv"))


def _read_file(path: Path, runs: _Runs) -> str | None:
    if _is_event_file(path.name):
        return _read_event_file(path, runs)
    if path.name.endswith(".csv"):
        return _read_csv(path, runs)
    return _read_jsonl(path, runs)


def load(path: str | os.PathLike[str], *, run: str | None = None) -> list[RunData]:
    """Read every run under ``path`` that holds gradient data.

    Args:
        path: A run folder, a tree of runs, or a single event / JSON-lines / CSV file.
        run: Keep runs whose folder relative to ``path`` matches this glob; a glob with ``#``
            is matched against ``<folder>#<run id>`` instead (``"*#3f9a*"``: one run by its id).

    Files and runs that give nothing are reported with a :class:`SkippedInput` warning each.

    Raises:
        InspectError: The path does not exist, or nothing readable with gradient data is there.
    """
    root = Path(path)
    if not root.exists():
        raise InspectError(f"{root}: no such file or folder")
    files: dict[Path, list[Path]] = {}
    if root.is_file():
        files[root.parent] = [root]
        base = root.parent
    else:
        base = root
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            chosen = [Path(dirpath) / f for f in sorted(filenames) if _is_log_file(f)]
            if chosen:
                files[Path(dirpath)] = chosen
    by_id = run is not None and "#" in run
    runs: list[RunData] = []
    for folder, paths in files.items():
        name = folder.relative_to(base).as_posix() if folder != base else "."
        if run is not None and not by_id and not fnmatch.fnmatch(name, run):
            continue
        found = _Runs(name)
        for p in paths:
            why = _read_file(p, found)
            if why is not None:
                _skip(p.relative_to(base).as_posix(), why)
        for data in found.runs():
            if by_id and not fnmatch.fnmatch(f"{name}#{data.run_id or ''}", run or ""):
                continue
            if data.foreign and not data.events:
                data.events = judge_foreign(data)
            if data.has_data:
                runs.append(data)
            elif data.meta:  # opened by a meta record, then nothing: say so
                _skip(f"run {data.name}", "no gradient data was written for it")
    if not runs:
        what = "no run matches --run" if run is not None and files else "no gradient data"
        raise InspectError(f"{root}: {what} (gradwatch or Lightning grad_norm logs)")
    return runs


def judge_foreign(run: RunData, thresholds: HealthThresholds | None = None) -> list[GradientEvent]:
    """Apply the health rules to norms gradwatch did not write.

    Sizes are unknown there, so each norm is judged as if it were an RMS; names ending in ``bias``
    are treated as 1-D tensors, others as weights.
    """
    names = [n for n in run.norms if n != tags.GLOBAL_NAME]
    shapes = {n: ((1,) if n.endswith("bias") else (1, 1)) for n in names}
    monitor = HealthMonitor(shapes, thresholds or HealthThresholds())
    steps = sorted({s for n in names for s in run.norms[n]})
    events: list[GradientEvent] = []
    for step in steps:
        obs = {n: run.norms[n][step] for n in names if step in run.norms[n]}
        events.extend(monitor.observe(step, obs))
    return events
