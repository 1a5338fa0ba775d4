"""What ``--plot`` draws, computed without matplotlib: module groups, the RMS grid, the checks.

A run becomes a :class:`RunPicture`: its tensors grouped by module (model order kept), a
tensor × step grid of gradient RMS (``norm / sqrt(numel)`` from the run's meta shapes; the L2
norm when the logs carry no shapes), the cells where gradwatch raised a vanishing, exploding or
non-finite event, the failing tensors (``mismatch`` / ``disconnected`` events, or a relative error
above ``rtol``) and, per module and check, the worst relative error.

Example:
    >>> module_of("model.transformer.encoder.layers.0.self_attn.in_proj_weight")
    'model.transformer.encoder.layers.0'
    >>> module_of("model.embedding.weight"), module_of("dense_1/kernel")
    ('model.embedding', 'dense_1')
    >>> shorten_left("transformer.decoder.layers.1.linear2.weight", 20)
    '…rs.1.linear2.weight'
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gradwatch.inspect.read import RunData
from gradwatch.watch import tags

__all__ = [
    "Check",
    "Failure",
    "ModuleGroup",
    "RunPicture",
    "group_tensors",
    "module_of",
    "picture_of",
    "shorten_left",
]

_PARTS = re.compile(r"([./])")
_CELL_KINDS = ("vanishing", "exploding", "nonfinite")
_FAIL_KINDS = ("mismatch", "disconnected")
TOP_LEVEL = "(top level)"


def module_of(name: str) -> str:
    """The module group of a tensor: its path up to the last numbered block, else its module.

    ``encoder.layers.3.self_attn.out_proj.weight`` belongs to ``encoder.layers.3`` (a block of a
    stack), ``encoder.norm.weight`` to ``encoder.norm``; a name without a separator to
    ``(top level)``.
    """
    tokens = _PARTS.split(name)  # names and separators alternate: ["a", ".", "0", ".", "w"]
    module = tokens[:-2]
    if not module:
        return TOP_LEVEL
    numbered = [i for i in range(0, len(module), 2) if module[i].isdigit()]
    end = numbered[-1] + 1 if numbered else len(module)
    return "".join(module[:end])


def shorten_left(text: str, width: int) -> str:
    """``text`` if it fits in ``width`` characters, else its tail after an ellipsis."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def tail_of(name: str, group: str) -> str:
    """What tells a tensor apart inside its group: the name after the group's path."""
    if group != TOP_LEVEL and len(name) > len(group) + 1 and name.startswith(group):
        return name[len(group) + 1 :]
    return name


@dataclass(frozen=True)
class ModuleGroup:
    """Consecutive tensors of one module group, in model order."""

    name: str
    tensors: tuple[str, ...]


def group_tensors(names: Sequence[str]) -> list[ModuleGroup]:
    """Consecutive names with the same :func:`module_of` form a group; order is kept.

    Example:
        >>> [g.name for g in group_tensors(["a.0.w", "a.0.b", "a.1.w", "head.w"])]
        ['a.0', 'a.1', 'head']
    """
    groups: list[tuple[str, list[str]]] = []
    for name in names:
        key = module_of(name)
        if groups and groups[-1][0] == key:
            groups[-1][1].append(name)
        else:
            groups.append((key, [name]))
    return [ModuleGroup(key, tuple(members)) for key, members in groups]


@dataclass
class Failure:
    """Why a tensor is marked failing: its failing checks and the worst relative error."""

    kinds: set[str] = field(default_factory=set)
    steps: set[int] = field(default_factory=set)
    worst: float = 0.0

    def label(self) -> str:
        """One short line, e.g. ``mismatch in 4 checks, worst 0.1``."""
        kind = "/".join(sorted(self.kinds)) or "fails"
        n = len(self.steps)
        worst = f", worst {self.worst:.2g}" if self.worst > 0 else ""
        return f"{kind} in {n} check{'s' if n != 1 else ''}{worst}"


@dataclass(frozen=True)
class Check:
    """The worst relative error of one module group at one check."""

    group: int
    step: int
    value: float
    failed: bool


@dataclass
class RunPicture:
    """Everything the plot of one run shows.

    Attributes:
        name: The run's name.
        groups: Tensors grouped by module, in model order.
        steps: The grid's columns (every step with a logged norm), ascending.
        values: Tensor × step grid, rows in group order: RMS (or L2 norm without shapes);
            ``nan`` where nothing was logged, ``inf`` where a non-finite value was.
        rms: Values are RMS (the logs carry shapes), not L2 norms.
        cells: ``(row, column) -> kind`` of the vanishing, exploding and non-finite events.
        failures: Failing tensor → why.
        modules: Modules the failing checks were localized to.
        checks: Worst relative error per module group and check.
        rtol: The tolerance the checks were judged against.
    """

    name: str
    groups: list[ModuleGroup]
    steps: list[int]
    values: np.ndarray
    rms: bool
    cells: dict[tuple[int, int], str]
    failures: dict[str, Failure]
    modules: list[str]
    checks: list[Check]
    rtol: float

    @property
    def tensors(self) -> list[str]:
        """Row names, top to bottom."""
        return [t for g in self.groups for t in g.tensors]


def _tensor_names(run: RunData, pattern: re.Pattern[str] | None) -> list[str]:
    names = list(run.norms)
    names += [n for n in run.rel_errors if n != tags.MAX_NAME]
    names += [e.param for e in run.events]
    skip = (tags.GLOBAL_NAME, tags.MAX_NAME)
    return [
        n
        for n in dict.fromkeys(names)
        if n not in skip and (pattern is None or pattern.search(n) is not None)
    ]


def _grid(run: RunData, names: list[str], steps: list[int]) -> tuple[np.ndarray, bool]:
    shapes = run.meta.get("shapes") or {}
    values = np.full((len(names), len(steps)), np.nan)
    column = {s: j for j, s in enumerate(steps)}
    for i, name in enumerate(names):
        shape = shapes.get(name)
        scale = math.sqrt(max(1, math.prod(shape))) if shape else 1.0
        for step, norm in run.norms.get(name, {}).items():
            values[i, column[step]] = norm / scale if math.isfinite(norm) else math.inf
    return values, bool(shapes)


def _cells(run: RunData, names: list[str], steps: list[int]) -> dict[tuple[int, int], str]:
    row = {n: i for i, n in enumerate(names)}
    column = {s: j for j, s in enumerate(steps)}
    cells: dict[tuple[int, int], str] = {}
    for e in run.events:
        if e.kind in _CELL_KINDS and e.param in row and e.step in column:
            cells[(row[e.param], column[e.step])] = e.kind
    return cells


def _failures(run: RunData, names: list[str]) -> dict[str, Failure]:
    wanted = set(names)
    failures: dict[str, Failure] = {}
    for e in run.events:
        if e.kind in _FAIL_KINDS and e.param in wanted:
            f = failures.setdefault(e.param, Failure())
            f.kinds.add(e.kind)
            f.steps.add(e.step)
            if math.isfinite(e.value):
                f.worst = max(f.worst, e.value)
    for name, series in run.rel_errors.items():
        if name not in wanted:
            continue
        for step, value in series.items():
            if value > run.rtol or not math.isfinite(value):
                f = failures.setdefault(name, Failure())
                f.steps.add(step)
                f.worst = max(f.worst, value if math.isfinite(value) else 0.0)
    return failures


def _checks(run: RunData, groups: list[ModuleGroup], failures: dict[str, Failure]) -> list[Check]:
    checks: list[Check] = []
    for index, group in enumerate(groups):
        worst: dict[int, float] = {}
        failed: set[int] = set()
        for name in group.tensors:
            for step, value in run.rel_errors.get(name, {}).items():
                worst[step] = max(worst.get(step, 0.0), value)
            if name in failures:
                failed.update(failures[name].steps)
        for step in sorted(worst.keys() | failed):
            value = worst.get(step, math.nan)
            bad = step in failed or value > run.rtol
            checks.append(Check(index, step, value, bad))
    return checks


def picture_of(run: RunData, pattern: re.Pattern[str] | None = None) -> RunPicture:
    """What the plot shows of ``run`` (tensors whose name matches ``pattern``, if given)."""
    groups = group_tensors(_tensor_names(run, pattern))
    names = [t for g in groups for t in g.tensors]
    steps = sorted({s for n in names for s in run.norms.get(n, {})})
    values, rms = _grid(run, names, steps)
    failures = _failures(run, names)
    modules = sorted(
        {e.module for e in run.events if e.kind in _FAIL_KINDS and e.module is not None}
    )
    return RunPicture(
        name=run.name,
        groups=groups,
        steps=steps,
        values=values,
        rms=rms,
        cells=_cells(run, names, steps),
        failures=failures,
        modules=modules,
        checks=_checks(run, groups, failures),
        rtol=run.rtol,
    )
