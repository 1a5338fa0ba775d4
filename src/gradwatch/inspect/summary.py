"""Per-parameter summaries of runs: the table, the grouped events, and the ``--json`` document.

Names are never cut: piped (CI logs, ``less``), the table takes the width its longest name needs;
on a terminal, long names wrap inside their cell.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gradwatch.inspect.read import InspectError, RunData
from gradwatch.report import GradientEvent, json_float
from gradwatch.watch import tags

__all__ = [
    "EventGroup",
    "ParamSummary",
    "events_of",
    "group_events",
    "notes",
    "print_tables",
    "summarise",
    "to_json",
]

#: What ``--events`` can ask for: events grouped by kind, module and parameter, or each one.
EventsView = Literal["grouped", "all"]
_DETAILS_HINT = "event details need a TensorBoard logger or GradWatch(jsonl_path=...)"


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
    """``(run name, event)`` for every recorded event kept by the ``param`` filter, in run and
    step order (``global`` events are always kept)."""
    pattern = re.compile(param) if param else None
    out = [
        (r.name, e)
        for r in runs
        for e in r.events
        if pattern is None or e.param == tags.GLOBAL_NAME or pattern.search(e.param)
    ]
    order = {r.name: i for i, r in enumerate(runs)}  # the tables' order: a file's runs as written
    return sorted(out, key=lambda x: (order[x[0]], x[1].step))


def module_of(event: GradientEvent) -> str | None:
    """The module an event was localized to (``None`` until localized, and in older logs)."""
    module = getattr(event, "module", None)
    return None if module is None else str(module)


@dataclass(frozen=True)
class EventGroup:
    """Events of one run with the same kind, module and parameter."""

    run: str
    kind: str
    module: str | None
    param: str
    count: int
    first_step: int
    last_step: int
    first: GradientEvent


def group_events(events: Sequence[tuple[str, GradientEvent]]) -> list[EventGroup]:
    """Group ``(run, event)`` pairs by run, kind, module and parameter, in order of appearance.

    Example:
        >>> e = GradientEvent(3, "mismatch", "w", 0.2, 1e-3, "w is wrong")
        >>> g, = group_events([("r", e), ("r", GradientEvent(9, "mismatch", "w", 0.3, 1e-3, ""))])
        >>> g.count, g.first_step, g.last_step
        (2, 3, 9)
    """
    groups: dict[tuple[str, str, str | None, str], list[GradientEvent]] = {}
    for run, e in events:
        groups.setdefault((run, e.kind, module_of(e), e.param), []).append(e)
    return [
        EventGroup(
            run=run,
            kind=kind,
            module=module,
            param=param,
            count=len(evs),
            first_step=min(e.step for e in evs),
            last_step=max(e.step for e in evs),
            first=min(evs, key=lambda e: e.step),
        )
        for (run, kind, module, param), evs in groups.items()
    ]


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


def notes(runs: Sequence[RunData]) -> list[str]:
    """One line per run whose logs count events that no record describes (a CSV-only run)."""
    out = []
    for run in runs:
        missing = run.undetailed_counts()
        if missing:
            out.append(
                f"run {run.name}: {sum(missing.values())} event(s) counted in the logs without"
                f" details ({_kinds(missing)}); {_DETAILS_HINT}"
            )
    return out


def has_events(runs: Sequence[RunData], param: str | None = None) -> bool:
    """Whether the runs hold events (the ``param`` filter applied to recorded ones); events known
    only by their counts always count, since their parameters are unknown."""
    return bool(events_of(runs, param)) or any(r.undetailed_counts() for r in runs)


def to_json(runs: Sequence[RunData], param: str | None = None) -> dict[str, Any]:
    """The ``--json`` document (DESIGN §1), the same shape whatever the number of runs.

    ``{"runs": [run, ...], "params": {run: {param: {...}}}, "events": [{...}, ...],
    "event_counts": {run: {kind: n}}, "notes": [...]}``; ``event_counts`` include events known only
    by the count scalars of a CSV log, which ``events`` cannot list.
    """
    params: dict[str, dict[str, Any]] = {r.name: {} for r in runs}
    for row in summarise(runs, param):
        params[row.run][row.param] = {
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
            "module": module_of(e),
            "value": json_float(e.value),
            "threshold": json_float(e.threshold),
            "message": e.message,
        }
        for run, e in events_of(runs, param)
    ]
    return {
        "runs": [r.name for r in runs],
        "params": params,
        "events": events,
        "event_counts": {r.name: dict(sorted(r.kind_counts().items())) for r in runs},
        "notes": notes(runs),
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _is_tty(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


def print_tables(
    runs: Sequence[RunData],
    param: str | None,
    file: Any = None,
    *,
    events: EventsView = "grouped",
    width: int | None = None,
) -> None:
    """Rich tables per run, problems highlighted, then the events.

    Args:
        runs: What :func:`~gradwatch.inspect.load` read.
        param: Keep parameters matching this regular expression.
        file: Where to print (standard output by default).
        events: ``"grouped"``: per run, kind and module, one line per parameter with its count and
            first/last step, and the first message; ``"all"``: every event in full.
        width: Columns to lay out in. ``None``: the terminal's width when ``file`` is a terminal
            (long names wrap), else as wide as the content needs (nothing is cut or wrapped).
    """
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError as exc:  # pragma: no cover - the inspect extra brings it
        raise InspectError("the table needs rich: pip install 'gradwatch[inspect]'") from exc
    out = file or sys.stdout
    tty = _is_tty(out)
    if width is None and tty:
        width = shutil.get_terminal_size().columns
    wrap = width is not None
    # Piped: a width no line reaches, so rich lays tables out at their natural width.
    console = Console(
        file=out, width=width or 1_000_000, soft_wrap=not wrap, force_terminal=tty or None
    )
    rows = summarise(runs, param)
    for run in runs:
        title = f"run {run.name}" + (
            " (norms from Lightning grad_norm logs)" if run.foreign else ""
        )
        table = Table(title=escape(title), title_justify="left")
        # Long names fold inside their cell; numbers never wrap; headers may.
        table.add_column("parameter", justify="left", overflow="fold", min_width=20)
        for col in ("steps", "last\nnorm", "min\nnorm", "max\nnorm", "worst\nrel err"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("events", justify="right", overflow="fold")
        rtol = run.rtol
        # Events known only by their counts (a CSV log) cannot be put on a row: "?" not "0".
        unknown = "?" if run.undetailed_counts() else "0"
        for row in (r for r in rows if r.run == run.name):
            bad_err = row.rel_error_max is not None and row.rel_error_max > rtol
            nonfinite = row.grad_norm_last is not None and not math.isfinite(row.grad_norm_last)
            style = "bold red" if (row.events or bad_err or nonfinite) else None
            kinds = sorted({e.kind for e in run.events if e.param == row.param})
            table.add_row(
                escape(row.param),
                str(row.steps),
                _fmt(row.grad_norm_last),
                _fmt(row.grad_norm_min),
                _fmt(row.grad_norm_max),
                _fmt(row.rel_error_max),
                f"{row.events} ({', '.join(kinds)})" if row.events else unknown,
                style=style,
            )
        console.print(table)
    listed = events_of(runs, param)
    many = len(runs) > 1
    if not listed:
        if not any(r.undetailed_counts() for r in runs):
            console.print("no events")
    elif events == "all":
        console.print(f"[bold]{len(listed)} event(s)[/bold]")
        for run_name, e in listed:
            where = f"{run_name} " if many else ""
            module = module_of(e)
            console.print(
                f"  {escape(where)}step {e.step}: [red]{e.kind}[/red] {escape(e.param)}"
                + (f" (module {escape(module)})" if module else "")
                + f": {escape(e.message)}",
                highlight=False,
            )
    else:
        groups = group_events(listed)
        console.print(
            f"[bold]{len(listed)} event(s)[/bold] in {len(groups)} group(s) by kind, module and"
            " parameter; --events all lists each one",
            highlight=False,
        )
        _print_groups(console, groups, many, escape)
    for line in notes(runs):
        console.print(f"[bold red]{escape(line)}[/bold red]", highlight=False)


def _print_groups(console: Any, groups: Sequence[EventGroup], many: bool, escape: Any) -> None:
    heads: dict[tuple[str, str, str | None], list[EventGroup]] = {}
    for g in groups:
        heads.setdefault((g.run, g.kind, g.module), []).append(g)
    for (run, kind, module), members in heads.items():
        total = sum(g.count for g in members)
        where = f"module {module}" if module else "module not localized"
        console.print(
            (f"{escape(run)}: " if many else "")
            + f"[red]{kind}[/red]: {total} event(s) in {len(members)} tensor(s), {escape(where)}",
            highlight=False,
        )
        pad = max(len(g.param) for g in members)
        for g in members:
            steps = (
                f"step {g.first_step}"
                if g.first_step == g.last_step
                else f"steps {g.first_step}–{g.last_step}"
            )
            console.print(
                f"    {escape(g.param.ljust(pad))}  {g.count:>4} event(s)  {steps}",
                highlight=False,
            )
        first = min((g.first for g in members), key=lambda e: e.step)
        console.print(
            f"    first, step {first.step}, {escape(first.param)}: {escape(first.message)}",
            highlight=False,
        )
