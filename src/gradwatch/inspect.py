"""Read gradwatch logs back: TensorBoard event files and JSON lines → records, tables, JSON, plots.

``load(path)`` walks a run folder or a tree of runs (Lightning ``version_*``, Keras ``gradwatch/``),
reading TensorBoard event files — simple scalars (torch's ``SummaryWriter``) and TF2 tensor
summaries (``tf.summary``) alike — and gradwatch JSON-lines files. Every record is kept (no
reservoir thinning). Event files are scanned record by record from memory-mapped bytes, and only
records that can carry gradient data are parsed, which makes the reader several times faster than
TensorBoard's ``EventAccumulator`` (``benchmarks/inspect_speed.py``).

Norms from logs gradwatch did not write (Lightning's ``grad_norm`` utility, tags
``grad_2.0_norm/<param>``) are recognised, and the health rules are applied to them after the fact.

Example:
    >>> from gradwatch.inspect import parse_grad_norm_tag
    >>> parse_grad_norm_tag("grad_2.0_norm/layer.weight")
    'layer.weight'
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import mmap
import os
import re
import struct
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch import tags
from gradwatch.core.health import HealthMonitor, HealthThresholds
from gradwatch.report import GradientEvent, json_float

__all__ = [
    "InspectError",
    "ParamSummary",
    "RunData",
    "load",
    "parse_grad_norm_tag",
    "plot",
    "run_cli",
    "summarise",
    "to_json",
]

_FOREIGN_NORM = re.compile(r"^grad_(?:[0-9.]+|inf)_norm(?:/(.+)|_total)$")
_MARKERS = (b"gradwatch/", b"grad_")
_HEADER = struct.Struct("<QI")


class InspectError(Exception):
    """A usage or input problem: one clear line for the user, exit status 2."""


def parse_grad_norm_tag(tag: str) -> str | None:
    """Parameter of a Lightning ``grad_norm`` tag (``"global"`` for the total), else ``None``.

    Example:
        >>> parse_grad_norm_tag("grad_2.0_norm_total"), parse_grad_norm_tag("train_loss")
        ('global', None)
    """
    m = _FOREIGN_NORM.match(tag)
    if m is None:
        return None
    name = m.group(1) or "global"
    for suffix in ("_step", "_epoch"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


@dataclass
class RunData:
    """Everything read for one run.

    Attributes:
        name: Path of the run folder relative to the inspected path (``"."`` for the path itself).
        norms: Parameter → ``{step: gradient L2 norm}`` (``"global"`` included).
        rel_errors: Parameter → ``{step: worst relative error}`` (``"max"`` included).
        events: Recorded events, or, for foreign norms, events found by the health rules.
        meta: Shapes and thresholds written by gradwatch, if any.
        foreign: Norms came from logs gradwatch did not write.
    """

    name: str
    norms: dict[str, dict[int, float]] = field(default_factory=dict)
    rel_errors: dict[str, dict[int, float]] = field(default_factory=dict)
    events: list[GradientEvent] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    foreign: bool = False

    @property
    def has_data(self) -> bool:
        return bool(self.norms or self.rel_errors or self.events)

    def add_event(self, event: GradientEvent) -> None:
        key = (event.step, event.kind, event.param, event.message)
        if all((e.step, e.kind, e.param, e.message) != key for e in self.events[-64:]):
            self.events.append(event)


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


def _read_event_file(path: Path, run: RunData) -> None:
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError as exc:  # pragma: no cover - the inspect extra brings it
        raise InspectError(
            "reading TensorBoard files needs: pip install 'gradwatch[inspect]'"
        ) from exc
    from google.protobuf.message import DecodeError

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
                    _add_scalar(run, value.tag, int(event.step), float(value.simple_value))
                elif kind == "tensor":
                    data = _tensor_value(value.tensor)
                    if isinstance(data, str):
                        _add_text(run, value.tag, data, path)
                    elif data is not None:
                        _add_scalar(run, value.tag, int(event.step), float(data))
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path}: cannot be read ({exc}); skipped", stacklevel=3)


def _add_scalar(run: RunData, tag: str, step: int, value: float) -> None:
    if tag.startswith(tags.NORM_PREFIX):
        run.norms.setdefault(tag[len(tags.NORM_PREFIX) :], {})[step] = value
    elif tag.startswith(tags.REL_ERROR_PREFIX):
        run.rel_errors.setdefault(tag[len(tags.REL_ERROR_PREFIX) :], {})[step] = value
    else:
        name = parse_grad_norm_tag(tag)
        if name is not None:
            run.foreign = True
            run.norms.setdefault(name, {})[step] = value


def _add_text(run: RunData, tag: str, text: str, path: Path) -> None:
    if tag.startswith(tags.EVENTS_TAG):
        try:
            run.add_event(GradientEvent.from_dict(json.loads(text)))
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}: an unreadable event text was skipped", stacklevel=4)
    elif tag.startswith(tags.META_TAG):
        with contextlib.suppress(ValueError):
            run.meta.update(json.loads(text))


def _read_jsonl(path: Path, run: RunData) -> None:
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    kind = rec.get("type")
                    if kind == "norms":
                        step = int(rec["step"])
                        for name, v in rec["values"].items():
                            run.norms.setdefault(name, {})[step] = float(v)
                        run.norms.setdefault("global", {})[step] = float(rec["global"])
                    elif kind == "report":
                        r = rec["report"]
                        step = int(r["step"]) if r.get("step") is not None else -1
                        for res in r.get("results", ()):
                            if res.get("rel_error") is None or res["status"] in ("kink", "zero"):
                                continue
                            series = run.rel_errors.setdefault(res["param"], {})
                            series[step] = max(series.get(step, 0.0), float(res["rel_error"]))
                        if r.get("max_rel_error") is not None:
                            run.rel_errors.setdefault("max", {})[step] = float(r["max_rel_error"])
                    elif kind == "event":
                        run.add_event(GradientEvent.from_dict(rec["event"]))
                    elif kind == "meta":
                        run.meta.update({k: v for k, v in rec.items() if k != "type"})
                except (ValueError, KeyError, TypeError, AttributeError):
                    warnings.warn(f"{path}:{lineno}: not a gradwatch record; skipped", stacklevel=3)
    except (OSError, UnicodeDecodeError) as exc:
        warnings.warn(f"{path}: cannot be read ({exc}); skipped", stacklevel=3)


def _is_event_file(name: str) -> bool:
    return "tfevents" in name


def load(path: str | os.PathLike[str], *, run: str | None = None) -> list[RunData]:
    """Read every run under ``path`` that holds gradient data.

    Args:
        path: A run folder, a tree of runs, or a single event / JSON-lines file.
        run: Keep runs whose path relative to ``path`` matches this glob.

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
            chosen = [
                Path(dirpath) / f
                for f in sorted(filenames)
                if _is_event_file(f) or f.endswith(".jsonl")
            ]
            if chosen:
                files[Path(dirpath)] = chosen
    runs: list[RunData] = []
    for folder, paths in files.items():
        name = folder.relative_to(base).as_posix() if folder != base else "."
        if run is not None and not fnmatch.fnmatch(name, run):
            continue
        data = RunData(name=name)
        for p in paths:
            if _is_event_file(p.name):
                _read_event_file(p, data)
            else:
                _read_jsonl(p, data)
        if data.foreign and not data.events:
            data.events = judge_foreign(data)
        if data.has_data:
            runs.append(data)
    if not runs:
        what = "no run matches --run" if run is not None and files else "no gradient data"
        raise InspectError(f"{root}: {what} (gradwatch or Lightning grad_norm logs)")
    return runs


def judge_foreign(run: RunData, thresholds: HealthThresholds | None = None) -> list[GradientEvent]:
    """Apply the health rules to norms gradwatch did not write.

    Sizes are unknown there, so each norm is judged as if it were an RMS; names ending in ``bias``
    are treated as 1-D tensors, others as weights.
    """
    names = [n for n in run.norms if n != "global"]
    shapes = {n: ((1,) if n.endswith("bias") else (1, 1)) for n in names}
    monitor = HealthMonitor(shapes, thresholds or HealthThresholds())
    steps = sorted({s for n in names for s in run.norms[n]})
    events: list[GradientEvent] = []
    for step in steps:
        obs = {n: run.norms[n][step] for n in names if step in run.norms[n]}
        events.extend(monitor.observe(step, obs))
    return events


# -- summaries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSummary:
    """One row of the table."""

    run: str
    param: str
    steps: int
    grad_norm_last: float | None
    grad_norm_min: float | None
    grad_norm_max: float | None
    rel_error_max: float | None
    events: int


def summarise(runs: Sequence[RunData], param: str | None = None) -> list[ParamSummary]:
    """Per run and parameter (model order, ``global`` last): steps, norms, worst error, events."""
    pattern = re.compile(param) if param else None
    rows: list[ParamSummary] = []
    for run in runs:
        names = list(run.norms)
        names += [n for n in run.rel_errors if n not in run.norms and n != "max"]
        names += [e.param for e in run.events if e.param not in names]
        names = [n for n in dict.fromkeys(names) if n != "global"] + (
            ["global"] if "global" in names else []
        )
        for name in names:
            if pattern is not None and not pattern.search(name):
                continue
            series = run.norms.get(name, {})
            last = series[max(series)] if series else None
            finite = [v for v in series.values() if math.isfinite(v)]
            errors = run.rel_errors.get(name, {})
            rows.append(
                ParamSummary(
                    run=run.name,
                    param=name,
                    steps=len(series),
                    grad_norm_last=last,
                    grad_norm_min=min(finite) if finite else None,
                    grad_norm_max=max(finite) if finite else None,
                    rel_error_max=max(errors.values()) if errors else None,
                    events=sum(e.param == name for e in run.events),
                )
            )
    return rows


def _events(runs: Sequence[RunData], param: str | None) -> list[tuple[str, GradientEvent]]:
    pattern = re.compile(param) if param else None
    out = [
        (r.name, e)
        for r in runs
        for e in r.events
        if pattern is None or e.param == "global" or pattern.search(e.param)
    ]
    return sorted(out, key=lambda x: (x[0], x[1].step))


def to_json(runs: Sequence[RunData], param: str | None = None) -> dict[str, Any]:
    """The ``--json`` document (DESIGN §1)."""
    many = len(runs) > 1
    params: dict[str, Any] = {}
    for row in summarise(runs, param):
        key = f"{row.run}:{row.param}" if many else row.param
        params[key] = {
            "steps": row.steps,
            "grad_norm_last": json_float(row.grad_norm_last),
            "grad_norm_min": json_float(row.grad_norm_min),
            "grad_norm_max": json_float(row.grad_norm_max),
            "rel_error_max": json_float(row.rel_error_max),
            "events": row.events,
        }
    events = [
        {
            "run": run,
            "step": e.step,
            "kind": e.kind,
            "param": e.param,
            "value": json_float(e.value),
            "threshold": json_float(e.threshold),
            "message": e.message,
        }
        for run, e in _events(runs, param)
    ]
    return {"runs": [r.name for r in runs], "params": params, "events": events}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def print_tables(runs: Sequence[RunData], param: str | None, file: Any = None) -> None:
    """Rich tables per run, problems highlighted, then the events."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError as exc:  # pragma: no cover - the inspect extra brings it
        raise InspectError("the table needs rich: pip install 'gradwatch[inspect]'") from exc
    console = Console(file=file or sys.stdout, width=120)
    rows = summarise(runs, param)
    for run in runs:
        title = f"run {run.name}" + (
            " (norms from Lightning grad_norm logs)" if run.foreign else ""
        )
        table = Table(title=title, title_justify="left")
        for col in (
            "parameter",
            "steps",
            "last norm",
            "min norm",
            "max norm",
            "worst rel err",
            "events",
        ):
            table.add_column(col, justify="left" if col == "parameter" else "right")
        rtol = float(run.meta.get("rtol", 1e-3))
        for row in (r for r in rows if r.run == run.name):
            bad_err = row.rel_error_max is not None and row.rel_error_max > rtol
            nonfinite = row.grad_norm_last is not None and not math.isfinite(row.grad_norm_last)
            style = "bold red" if (row.events or bad_err or nonfinite) else None
            kinds = sorted({e.kind for e in run.events if e.param == row.param})
            table.add_row(
                row.param,
                str(row.steps),
                _fmt(row.grad_norm_last),
                _fmt(row.grad_norm_min),
                _fmt(row.grad_norm_max),
                _fmt(row.rel_error_max),
                f"{row.events} ({', '.join(kinds)})" if row.events else "0",
                style=style,
            )
        console.print(table)
    events = _events(runs, param)
    if events:
        console.print(f"[bold]{len(events)} event(s)[/bold]")
        for run_name, e in events:
            where = f"{run_name} " if len(runs) > 1 else ""
            console.print(
                f"  {where}step {e.step}: [red]{e.kind}[/red] {e.param}: {e.message}",
                highlight=False,
            )
    else:
        console.print("no events")


# -- plot ---------------------------------------------------------------------------------------


def plot(runs: Sequence[RunData], out: str | os.PathLike[str], param: str | None = None) -> Path:
    """One PNG: per run a column with gradient size per layer (log scale) and relative errors."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise InspectError("--plot needs matplotlib: pip install 'gradwatch[inspect]'") from exc
    pattern = re.compile(param) if param else None
    fig, axes = plt.subplots(2, len(runs), figsize=(9 * len(runs), 8), squeeze=False)
    for col, run in enumerate(runs):
        ax, ax2 = axes[0][col], axes[1][col]
        shapes = run.meta.get("shapes", {})
        use_rms = bool(shapes)
        names = [n for n in run.norms if n != "global" and (pattern is None or pattern.search(n))]
        cmap = plt.get_cmap("viridis", max(2, len(names)))
        for i, name in enumerate(names):
            series = run.norms[name]
            steps = sorted(series)
            scale = math.sqrt(max(1, math.prod(shapes.get(name, [1])))) if use_rms else 1.0
            vals = [series[s] / scale for s in steps]
            ax.plot(steps, vals, color=cmap(i), lw=1.2, label=name if len(names) <= 12 else None)
        if use_rms:
            ax.axhline(
                run.meta.get("vanish_threshold", 1e-7),
                color="tab:blue",
                ls="--",
                lw=1,
                label="vanishing threshold",
            )
            ax.axhline(
                run.meta.get("explode_threshold", 1e3),
                color="tab:red",
                ls="--",
                lw=1,
                label="exploding threshold",
            )
        for e in run.events:
            if e.kind in ("vanishing", "exploding") and e.param in run.norms:
                ax.axvline(
                    e.step, color="tab:red" if e.kind == "exploding" else "tab:blue", alpha=0.3
                )
                ax.annotate(e.kind, (e.step, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top")
            elif e.kind == "nonfinite":
                ax.axvline(e.step, color="black", alpha=0.5)
                ax.annotate(
                    "nonfinite", (e.step, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top"
                )
        ax.set_yscale("log")
        ax.set_title(f"{run.name}: gradient {'RMS' if use_rms else 'L2 norm'} per layer")
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.2)
        if names:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        errs = {
            n: s
            for n, s in run.rel_errors.items()
            if n != "max" and (pattern is None or pattern.search(n))
        }
        for i, (name, series) in enumerate(errs.items()):
            steps = sorted(series)
            ax2.plot(
                steps,
                [max(series[s], 1e-16) for s in steps],
                "o-",
                ms=3,
                lw=1,
                color=cmap(i % max(2, len(names))),
                label=name if len(errs) <= 12 else None,
            )
        rtol = float(run.meta.get("rtol", 1e-3))
        ax2.axhline(rtol, color="tab:red", ls="--", lw=1, label=f"rtol {rtol:g}")
        for e in run.events:
            if e.kind in ("mismatch", "disconnected"):
                ax2.plot([e.step], [max(e.value, 1e-16)], "rx", ms=9)
        ax2.set_yscale("log")
        ax2.set_title(f"{run.name}: worst relative error per check")
        ax2.set_xlabel("step")
        ax2.grid(True, which="both", alpha=0.2)
        ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


# -- CLI ----------------------------------------------------------------------------------------


def run_cli(args: argparse.Namespace) -> int:
    """``gradwatch inspect``: 0 no events, 1 events found, 2 usage or input error."""
    try:
        if args.param is not None:
            try:
                re.compile(args.param)
            except re.error as exc:
                raise InspectError(
                    f"--param: invalid regular expression {args.param!r}: {exc}"
                ) from exc
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                runs = load(args.path, run=args.run)
            finally:
                for w in caught:
                    print(f"gradwatch: warning: {w.message}", file=sys.stderr)
        if args.json:
            print(json.dumps(to_json(runs, args.param), indent=2, allow_nan=False))
        else:
            print_tables(runs, args.param)
        if args.plot:
            where = plot(runs, args.plot, args.param)
            if not args.json:
                print(f"plot written to {where}")
    except InspectError as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    found = any(r.events for r in runs) if args.param is None else bool(_events(runs, args.param))
    return 1 if found and not args.exit_zero else 0
