"""The texts beside a run's plot and the sizes they take: notes, labels, rows, fonts, in inches.

Labels never overlap: every text sits on its own row, and the row height and font size follow the
number of tensors. :class:`Notes` holds the texts at the right of the rows and :class:`Layout` the
sizes of one run's column in the figure :mod:`~gradwatch.inspect.plot` draws.

Example:
    >>> is_related("encoder.layers.3.attn", "encoder.layers.3"), is_related("decoder", "encoder")
    (True, False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gradwatch.inspect.plot_data import RunPicture, shorten_left, tail_of

__all__ = [
    "ABOVE_STRIP_IN",
    "BELOW_HEAT_IN",
    "BOTTOM_IN",
    "CBAR_IN",
    "HEAT_IN",
    "LABEL_CHARS",
    "TOP_IN",
    "Layout",
    "Notes",
    "group_labels",
    "is_related",
    "row_labels",
]

#: Widest label, in characters; a longer name keeps its tail after an ellipsis.
LABEL_CHARS = 48
HEAT_IN = 6.0  # heatmap width (inches)
TOP_IN, BELOW_HEAT_IN, CBAR_IN, ABOVE_STRIP_IN, BOTTOM_IN = 0.9, 0.7, 0.13, 1.0, 0.55


@dataclass
class Notes:
    """The texts at the right of the rows: per tensor row, per group header, per strip row."""

    rows: dict[int, str] = field(default_factory=dict)
    failing: set[int] = field(default_factory=set)
    headers: dict[int, str] = field(default_factory=dict)
    strips: dict[int, tuple[str, bool]] = field(default_factory=dict)

    @classmethod
    def of(cls, p: RunPicture) -> Notes:
        notes = cls()
        for row, name in enumerate(p.tensors):
            parts = [p.failures[name].label()] if name in p.failures else []
            kinds = {k: c for (r, c), k in sorted(p.cells.items(), reverse=True) if r == row}
            parts += [f"{k} at step {p.steps[c]}" for k, c in sorted(kinds.items())]
            if parts:
                notes.rows[row] = "; ".join(parts)
            if name in p.failures:
                notes.failing.add(row)
        for index, group in enumerate(p.groups):
            inside = [m for m in p.modules if is_related(m, group.name)]
            if inside:
                where = ", ".join(
                    "this module" if m == group.name else tail_of(m, group.name) for m in inside
                )
                notes.headers[index] = f"← localized: {shorten_left(where, LABEL_CHARS)}"
        for index in {c.group for c in p.checks}:
            mine = [c for c in p.checks if c.group == index]
            worst = max((c.value for c in mine if not math.isnan(c.value)), default=math.nan)
            failed = sum(c.failed for c in mine)
            text = f"✗ {failed}/{len(mine)} checks fail, worst {worst:.2g}"
            notes.strips[index] = (text, True) if failed else (f"worst {worst:.2g}", False)
        return notes

    def widest(self) -> int:
        texts = [*self.rows.values(), *self.headers.values()]
        texts += [t for t, _ in self.strips.values()]
        return max(map(len, texts), default=0)


def is_related(module: str, group: str) -> bool:
    """A localized module lies in a group, or the group lies in the module."""
    return module == group or module.startswith(group + ".") or group.startswith(module + ".")


def row_labels(p: RunPicture) -> list[str]:
    return [shorten_left(tail_of(t, g.name), LABEL_CHARS) for g in p.groups for t in g.tensors]


def group_labels(p: RunPicture) -> list[str]:
    return [shorten_left(g.name, LABEL_CHARS) for g in p.groups]


def _text_inches(chars: int, font: float) -> float:
    return chars * font * 0.62 / 72


def _font(row_in: float) -> float:
    """Type that fits a row of ``row_in`` inches (below 4 pt, labels are left out)."""
    return min(9.0, row_in * 72 * 0.62)


@dataclass(frozen=True)
class Layout:
    """Sizes of one run's column (inches, points)."""

    row_in: float
    font: float
    strip_font: float
    label_in: float
    note_in: float
    heat_h: float
    strip_h: float

    @classmethod
    def of(cls, p: RunPicture, notes: Notes) -> Layout:
        units = len(p.tensors) + len(p.groups)
        # up to ~100 rows the heatmap is ~14 in tall; beyond, rows shrink to 0.13 in (6 pt type)
        row_in = max(0.13, min(0.22, 14.0 / max(1, units))) if units <= 400 else 52.0 / units
        strip_row_in = max(row_in, 0.2)
        font, strip_font = _font(row_in), _font(strip_row_in)
        rows = max(map(len, row_labels(p)), default=0)
        groups = max(map(len, group_labels(p)), default=0)
        label_in = max(_text_inches(rows, font), 1.1 * _text_inches(groups, strip_font)) + 0.3
        note_in = max(0.4, _text_inches(notes.widest(), max(font, strip_font)) + 0.3)
        strip_h = max(1, len(p.groups)) * strip_row_in + 0.1
        return cls(row_in, font, strip_font, label_in, note_in, max(units, 1) * row_in, strip_h)

    @property
    def width(self) -> float:
        return self.label_in + HEAT_IN + self.note_in

    @property
    def height(self) -> float:
        middle = BELOW_HEAT_IN + CBAR_IN + ABOVE_STRIP_IN
        return TOP_IN + self.heat_h + middle + self.strip_h + BOTTOM_IN
