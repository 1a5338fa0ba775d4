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

The records of a run are :class:`~gradwatch.inspect.run_data.RunData` (re-exported here); the
readers of each format are in :mod:`~gradwatch.inspect.log_formats`.

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

import fnmatch
import os
import warnings
from pathlib import Path

from gradwatch.core.health import HealthMonitor, HealthThresholds
from gradwatch.inspect.log_formats import is_log_file, read_file
from gradwatch.inspect.run_data import FolderRuns, InspectError, RunData, parse_grad_norm_tag
from gradwatch.report import GradientEvent
from gradwatch.watch import tags

__all__ = [
    "InspectError",
    "RunData",
    "SkippedInput",
    "judge_foreign",
    "load",
    "parse_grad_norm_tag",
]


class SkippedInput(UserWarning):
    """A file or run under the inspected path gave no gradient data; the message says why."""


def _skip(what: str, why: str) -> None:
    text = f"skipped {what}: {why}".replace("\n", " ")
    warnings.warn(text, SkippedInput, stacklevel=3)


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
            chosen = [Path(dirpath) / f for f in sorted(filenames) if is_log_file(f)]
            if chosen:
                files[Path(dirpath)] = chosen
    by_id = run is not None and "#" in run
    runs: list[RunData] = []
    for folder, paths in files.items():
        name = folder.relative_to(base).as_posix() if folder != base else "."
        if run is not None and not by_id and not fnmatch.fnmatch(name, run):
            continue
        found = FolderRuns(name)
        for p in paths:
            why = read_file(p, found)
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
