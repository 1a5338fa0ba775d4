"""Per-parameter summaries of runs: the table, and the ``--json`` document."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradwatch.inspect.read import InspectError, RunData
from gradwatch.report import GradientEvent, json_float
from gradwatch.watch import tags

__all__ = ["ParamSummary", "events_of", "print_tables", "summarise", "to_json"]


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
        names += [n for n in run.rel_errors if n not in run.norms and n != tags.MAX_NAME]
        names += [e.param for e in run.events if e.param not in names]
        names = [n for n in dict.fromkeys(names) if n != tags.GLOBAL_NAME] + (
            [tags.GLOBAL_NAME] if tags.GLOBAL_NAME in names else []
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


def events_of(runs: Sequence[RunData], param: str | None) -> list[tuple[str, GradientEvent]]:
    pattern = re.compile(param) if param else None
    out = [
        (r.name, e)
        for r in runs
        for e in r.events
        if pattern is None or e.param == tags.GLOBAL_NAME or pattern.search(e.param)
    ]
    order = {r.name: i for i, r in enumerate(runs)}  # the tables' order: a file's runs as written
    return sorted(out, key=lambda x: (order[x[0]], x[1].step))


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
        for run, e in events_of(runs, param)
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
        rtol = run.rtol
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
    events = events_of(runs, param)
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
