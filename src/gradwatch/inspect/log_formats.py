"""The log formats ``gradwatch inspect`` reads, one reader each, into the runs of a folder.

TensorBoard event files (simple scalars and TF2 tensor summaries, scanned record by record from
memory-mapped bytes, only records that can carry gradient data parsed), gradwatch JSON-lines files
and Lightning ``CSVLogger`` files. Each reader returns why a file gave nothing (``None``: it gave
data); :func:`~gradwatch.inspect.read.load` walks the folders and reports those reasons.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import mmap
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradwatch.inspect.run_data import FolderRuns, InspectError, RunData, parse_grad_norm_tag
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch import tags

__all__ = ["is_log_file", "read_file"]

_MARKERS = (b"gradwatch/", b"grad_")
_HEADER = struct.Struct("<QI")


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


def _read_event_file(path: Path, runs: FolderRuns) -> str | None:
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


def _add_text(
    runs: FolderRuns, run: RunData, tag: str, text: str, path: Path
) -> tuple[RunData, bool]:
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


def _read_jsonl(path: Path, runs: FolderRuns) -> str | None:
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


def _read_csv(path: Path, runs: FolderRuns) -> str | None:
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


def is_log_file(name: str) -> bool:
    return _is_event_file(name) or name.endswith((".jsonl", ".csv"))


def read_file(path: Path, runs: FolderRuns) -> str | None:
    if _is_event_file(path.name):
        return _read_event_file(path, runs)
    if path.name.endswith(".csv"):
        return _read_csv(path, runs)
    return _read_jsonl(path, runs)
