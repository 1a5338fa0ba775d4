"""``--plot``: per run, a tensor × step heatmap of gradient RMS and a strip of checks per module.

Each run is one column of the figure (several runs: columns side by side, one file). On top, one
row per tensor, grouped under a bold header per module (``encoder.layers.3``, ``decoder``, ...), one
column per logged step, coloured by gradient RMS on a log scale; the cells where gradwatch raised a
vanishing, exploding or non-finite event are outlined and hatched; tensors that fail a check have
their name in red and, at the right of their row, what failed. Below, one row per module group and
a marker per check: the worst relative error of its tensors, green within ``rtol``, a red cross
above it, and at the right of the row how many checks failed and the worst error.

Labels never overlap: every text sits on its own row, and the row height and font size follow the
number of tensors (a 200-tensor run is a tall figure with small type, not a tangle).

Example:
    >>> from gradwatch.inspect.read import RunData
    >>> run = RunData("r", norms={"net.0.weight": {0: 0.5}}, meta={"shapes": {"net.0.weight": [4]}})
    >>> fig = plot_figure([run])
    >>> [im.get_array().shape for im in fig.axes[0].images]
    [(1, 1)]
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.inspect.plot_data import RunPicture, picture_of, shorten_left, tail_of
from gradwatch.inspect.read import InspectError, RunData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["check_output", "plot", "plot_figure"]

#: Widest label, in characters; a longer name keeps its tail after an ellipsis.
LABEL_CHARS = 48
DPI = 100
_HEAT_IN = 6.0  # heatmap width (inches)
_TOP_IN, _BELOW_HEAT_IN, _CBAR_IN, _ABOVE_STRIP_IN, _BOTTOM_IN = 0.9, 0.7, 0.13, 1.0, 0.55
_MISSING, _ZERO, _NONFINITE = "#e3e3e3", "white", "black"
_FAIL, _PASS, _QUIET = "#c0392b", "#2e8b57", "0.35"
_MARKS = {
    "vanishing": ("tab:blue", "////"),
    "exploding": ("tab:red", "xxxx"),
    "nonfinite": ("black", "...."),
}


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError as exc:  # pragma: no cover
        raise InspectError("--plot needs matplotlib: pip install 'gradwatch[inspect]'") from exc
    return matplotlib


def check_output(out: str | os.PathLike[str]) -> Path:
    """``out`` if a plot can be written there, else :class:`InspectError` — before any work.

    Its folder must exist (it is not created: a typo should not make folders) and be writable,
    and its extension must be a format matplotlib writes (``.png``, ``.pdf``, ``.svg``, ...).
    """
    path = Path(out)
    folder = path.parent
    if path.is_dir():
        raise InspectError(f"--plot {path}: is a folder, not a file")
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist"
        raise InspectError(f"--plot {path}: cannot write there, {folder} {why}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InspectError(f"--plot {path}: cannot write there (permission denied)")
    _matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise InspectError(
            f"--plot {path}: unknown image format {path.suffix or '(no extension)'};"
            f" use one of {', '.join('.' + f for f in sorted(formats))}"
        )
    return path


# -- texts and sizes -------------------------------------------------------------------------------


@dataclass
class _Notes:
    """The texts at the right of the rows: per tensor row, per group header, per strip row."""

    rows: dict[int, str] = field(default_factory=dict)
    failing: set[int] = field(default_factory=set)
    headers: dict[int, str] = field(default_factory=dict)
    strips: dict[int, tuple[str, bool]] = field(default_factory=dict)

    @classmethod
    def of(cls, p: RunPicture) -> _Notes:
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
            inside = [m for m in p.modules if _related(m, group.name)]
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


def _related(module: str, group: str) -> bool:
    """A localized module lies in a group, or the group lies in the module."""
    return module == group or module.startswith(group + ".") or group.startswith(module + ".")


def _row_labels(p: RunPicture) -> list[str]:
    return [shorten_left(tail_of(t, g.name), LABEL_CHARS) for g in p.groups for t in g.tensors]


def _group_labels(p: RunPicture) -> list[str]:
    return [shorten_left(g.name, LABEL_CHARS) for g in p.groups]


def _text_inches(chars: int, font: float) -> float:
    return chars * font * 0.62 / 72


def _font(row_in: float) -> float:
    """Type that fits a row of ``row_in`` inches (below 4 pt, labels are left out)."""
    return min(9.0, row_in * 72 * 0.62)


@dataclass(frozen=True)
class _Layout:
    """Sizes of one run's column (inches, points)."""

    row_in: float
    font: float
    strip_font: float
    label_in: float
    note_in: float
    heat_h: float
    strip_h: float

    @classmethod
    def of(cls, p: RunPicture, notes: _Notes) -> _Layout:
        units = len(p.tensors) + len(p.groups)
        # up to ~100 rows the heatmap is ~14 in tall; beyond, rows shrink to 0.13 in (6 pt type)
        row_in = max(0.13, min(0.22, 14.0 / max(1, units))) if units <= 400 else 52.0 / units
        strip_row_in = max(row_in, 0.2)
        font, strip_font = _font(row_in), _font(strip_row_in)
        rows = max(map(len, _row_labels(p)), default=0)
        groups = max(map(len, _group_labels(p)), default=0)
        label_in = max(_text_inches(rows, font), 1.1 * _text_inches(groups, strip_font)) + 0.3
        note_in = max(0.4, _text_inches(notes.widest(), max(font, strip_font)) + 0.3)
        strip_h = max(1, len(p.groups)) * strip_row_in + 0.1
        return cls(row_in, font, strip_font, label_in, note_in, max(units, 1) * row_in, strip_h)

    @property
    def width(self) -> float:
        return self.label_in + _HEAT_IN + self.note_in

    @property
    def height(self) -> float:
        middle = _BELOW_HEAT_IN + _CBAR_IN + _ABOVE_STRIP_IN
        return _TOP_IN + self.heat_h + middle + self.strip_h + _BOTTOM_IN


# -- the heatmap -----------------------------------------------------------------------------------


def _positions(p: RunPicture) -> tuple[list[float], list[float]]:
    """y of each group header and of each tensor row: one unit per line, top to bottom."""
    headers: list[float] = []
    rows: list[float] = []
    y = 0.0
    for group in p.groups:
        headers.append(y)
        rows.extend(y + 1 + k for k in range(len(group.tensors)))
        y += 1 + len(group.tensors)
    return headers, rows


def _color_range(values: np.ndarray) -> tuple[float, float]:
    """The smallest and largest positive finite value (a decade either side of a single one)."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return 1e-8, 1.0
    lo, hi = float(positive.min()), float(positive.max())
    if hi <= lo * 1.001:  # one value (a one-step run of one tensor)
        lo, hi = lo / 10, hi * 10
    return lo, hi


def _shown(values: np.ndarray, lo: float, hi: float) -> np.ma.MaskedArray[Any, Any]:
    """Zeros below the scale (drawn white), non-finite above it (black), missing masked."""
    shown = values.copy()
    shown[values == 0] = lo / 10
    shown[np.isposinf(values)] = hi * 10
    return np.ma.masked_invalid(shown)


def _draw_cells(ax: Axes, p: RunPicture, rows: list[float]) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    for kind, (color, hatch) in _MARKS.items():
        boxes = [
            Rectangle((c - 0.5, rows[r] - 0.5), 1, 1) for (r, c), k in p.cells.items() if k == kind
        ]
        if boxes:
            marks = PatchCollection(
                boxes, facecolors="none", edgecolors=color, hatch=hatch, linewidths=1.2
            )
            marks.set_gid(f"gradwatch:cells:{kind}")
            ax.add_collection(marks)


def _draw_images(ax: Axes, p: RunPicture, headers: list[float]) -> Any:
    """One image per module group (the header rows between them stay white); the last one."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=_MISSING, under=_ZERO, over=_NONFINITE)
    columns = max(1, len(p.steps))
    lo, hi = _color_range(p.values)
    norm = LogNorm(lo, hi)
    shown = _shown(p.values, lo, hi)
    image: Any = ScalarMappable(norm=norm, cmap=cmap)
    start = 0
    for group, y in zip(p.groups, headers, strict=True):
        n = len(group.tensors)
        data = (
            shown[start : start + n] if p.steps else np.ma.masked_invalid(np.full((n, 1), np.nan))
        )
        image = ax.imshow(
            data,
            cmap=cmap,
            norm=norm,
            aspect="auto",
            interpolation="nearest",
            extent=(-0.5, columns - 0.5, y + n + 0.5, y + 0.5),
        )
        image.set_gid(f"gradwatch:heatmap:{group.name}")
        start += n
    return image


def _label_rows(
    ax: Axes, p: RunPicture, notes: _Notes, layout: _Layout, where: tuple[list[float], list[float]]
) -> None:
    from matplotlib.transforms import blended_transform_factory

    headers, rows = where
    across = blended_transform_factory(ax.transAxes, ax.transData)
    font = max(layout.font, 4.0)
    show = layout.font >= 4.0
    ax.set_yticks(rows, _row_labels(p) if show else [])
    ax.tick_params(axis="y", labelsize=font, length=0, pad=2)
    for row, tick in enumerate(ax.get_yticklabels()):
        if row in notes.failing:
            tick.set_color(_FAIL)
            tick.set_fontweight("bold")
    for index, (label, y) in enumerate(zip(_group_labels(p), headers, strict=True)):
        related = any(_related(m, p.groups[index].name) for m in p.modules)
        ax.text(
            -0.005,
            y,
            label,
            transform=across,
            ha="right",
            va="center",
            fontsize=font,
            fontweight="bold",
            color=_FAIL if related else "black",
        )
    for row, text in notes.rows.items():
        color = _FAIL if row in notes.failing else _QUIET
        ax.text(
            1.01,
            rows[row],
            text,
            transform=across,
            ha="left",
            va="center",
            fontsize=font,
            color=color,
            gid=f"gradwatch:note:{p.tensors[row]}",
        )
    for index, text in notes.headers.items():
        ax.text(
            1.01,
            headers[index],
            text,
            transform=across,
            ha="left",
            va="center",
            fontsize=font,
            fontweight="bold",
            color=_FAIL,
            gid=f"gradwatch:module:{p.groups[index].name}",
        )


def _step_ticks(ax: Axes, p: RunPicture) -> None:
    from matplotlib.ticker import MaxNLocator

    columns = max(1, len(p.steps))
    found = MaxNLocator(nbins=8, integer=True).tick_values(0, columns - 1)
    ticks = sorted({int(t) for t in found if 0 <= t <= columns - 1} | {0})
    ax.set_xticks(ticks, [str(p.steps[i]) for i in ticks] if p.steps else [""])
    ax.tick_params(axis="x", labelsize=7, top=True, labeltop=True)
    ax.set_xlabel("step", fontsize=8)
    ax.set_xlim(-0.5, columns - 0.5)


def _title(p: RunPicture) -> str:
    what = "RMS" if p.rms else "L2 norm (the logs carry no shapes)"
    parts = [f"{len(p.tensors)} tensors in {len(p.groups)} module groups"]
    if p.failures:
        parts.append(f"{len(p.failures)} fail a check (red)")
    if p.cells:
        parts.append(f"{len(p.cells)} health event(s) outlined")
    stray = [m for m in p.modules if not any(_related(m, g.name) for g in p.groups)]
    if stray:
        parts.append("localized: " + ", ".join(shorten_left(m, LABEL_CHARS) for m in stray))
    return f"{p.name}: gradient {what} per tensor and step\n" + "; ".join(parts)


def _draw_heatmap(ax: Axes, p: RunPicture, notes: _Notes, layout: _Layout) -> tuple[Any, str]:
    """The heatmap of one run; returns its colour mapping and what it shows (RMS or norm)."""
    headers, rows = _positions(p)
    image = _draw_images(ax, p, headers)
    _draw_cells(ax, p, rows)
    _label_rows(ax, p, notes, layout, (headers, rows))
    _step_ticks(ax, p)
    ax.set_ylim(len(headers) + len(rows) - 0.5, -0.5)
    ax.set_title(_title(p), fontsize=9, loc="left", pad=16)
    if not rows:
        ax.text(
            0.5,
            0.5,
            "no per-tensor norms in the logs",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
        )
    return image, "RMS" if p.rms else "L2 norm"


def _legend_handles() -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [
        Patch(facecolor="none", edgecolor=color, hatch=hatch, label=f"{kind} event")
        for kind, (color, hatch) in _MARKS.items()
    ]
    handles += [
        Patch(facecolor=_ZERO, edgecolor="0.5", label="exactly zero"),
        Patch(facecolor=_MISSING, label="not logged"),
        Line2D([], [], marker="s", ls="none", color=_FAIL, label="name: fails a check"),
    ]
    return handles


def _draw_colorbar(fig: Figure, cax: Axes, image: Any, what: str) -> None:
    bar = fig.colorbar(image, cax=cax, orientation="horizontal", extend="neither")
    bar.set_label(f"gradient {what} (log scale)", fontsize=8)
    norm = image.norm
    ticks = np.geomspace(norm.vmin, norm.vmax, 4).tolist()  # a log locator crowds short ranges
    bar.set_ticks(ticks, labels=[f"{t:.2g}" for t in ticks])
    bar.minorticks_off()
    cax.tick_params(labelsize=7)
    cax.legend(
        handles=_legend_handles(),
        loc="center left",
        bbox_to_anchor=(1.08, 0.5),
        ncol=2,
        fontsize=7,
        frameon=False,
        handlelength=1.4,
        columnspacing=1.0,
    )


# -- the strip of checks ---------------------------------------------------------------------------


def _draw_strip(ax: Axes, p: RunPicture, notes: _Notes, layout: _Layout) -> None:
    """One row per module group, one marker per check; the notes say what failed."""
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    ax.set_title(
        f"worst relative error per check and module group: ● within rtol {p.rtol:g}, ✗ above",
        fontsize=9,
        loc="left",
    )
    ax.set_ylim(max(1, len(p.groups)) - 0.5, -0.5)
    ax.set_yticks(range(len(p.groups)), _group_labels(p))
    ax.tick_params(axis="y", labelsize=layout.strip_font, length=0)
    for index, tick in enumerate(ax.get_yticklabels()):
        if notes.strips.get(index, ("", False))[1]:
            tick.set_color(_FAIL)
    if not p.checks:
        ax.text(
            0.5,
            0.5,
            "no gradient checks in the logs",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
        )
        ax.set_xticks([])
        return
    size = (layout.strip_font * 1.1) ** 2
    for failed, marker, color in ((False, "o", _PASS), (True, "X", _FAIL)):
        mine = [c for c in p.checks if c.failed is failed]
        dots = ax.scatter(
            [c.step for c in mine],
            [c.group for c in mine],
            s=size * (1.4 if failed else 1.0),
            marker=marker,
            color=color,
            zorder=3,
        )
        dots.set_gid(f"gradwatch:checks:{'fail' if failed else 'pass'}")
    steps = [c.step for c in p.checks]
    pad = max(1.0, 0.03 * (max(steps) - min(steps)))
    ax.set_xlim(min(steps) - pad, max(steps) + pad)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(axis="y", color="0.9", lw=0.6)
    across = blended_transform_factory(ax.transAxes, ax.transData)
    for index, (text, failed) in notes.strips.items():
        ax.text(
            1.01,
            index,
            text,
            transform=across,
            ha="left",
            va="center",
            fontsize=layout.strip_font,
            color=_FAIL if failed else _QUIET,
            gid=f"gradwatch:strip:{p.groups[index].name}",
        )


# -- the figure ------------------------------------------------------------------------------------


def _axes(fig: Figure, size: tuple[float, float], box: tuple[float, float, float, float]) -> Axes:
    """Axes at ``box`` = (left, top, width, height) in inches from the figure's top left."""
    width, height = size
    left, top, w, h = box
    return fig.add_axes((left / width, (height - top - h) / height, w / width, h / height))


def _draw_run(fig: Figure, p: RunPicture, x0: float, size: tuple[float, float]) -> None:
    notes = _Notes.of(p)
    layout = _Layout.of(p, notes)
    left = x0 + layout.label_in
    heat = _axes(fig, size, (left, _TOP_IN, _HEAT_IN, layout.heat_h))
    image, what = _draw_heatmap(heat, p, notes, layout)
    top = _TOP_IN + layout.heat_h + _BELOW_HEAT_IN
    cax = _axes(fig, size, (left, top, 0.4 * _HEAT_IN, _CBAR_IN))
    _draw_colorbar(fig, cax, image, what)
    top += _CBAR_IN + _ABOVE_STRIP_IN
    _draw_strip(_axes(fig, size, (left, top, _HEAT_IN, layout.strip_h)), p, notes, layout)


def plot_figure(runs: Sequence[RunData], param: str | None = None) -> Figure:
    """The figure ``--plot`` writes: one column per run (heatmap above, checks below).

    Args:
        runs: The runs read by :func:`gradwatch.inspect.load`.
        param: Keep tensors whose name matches this regular expression.

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot: nothing to close).
    """
    _matplotlib()
    from matplotlib.figure import Figure

    pattern = re.compile(param) if param else None
    pictures = [picture_of(run, pattern) for run in runs]
    layouts = [_Layout.of(p, _Notes.of(p)) for p in pictures]
    size = (sum(lay.width for lay in layouts), max(lay.height for lay in layouts))
    fig = Figure(figsize=size)
    x0 = 0.0
    for picture, lay in zip(pictures, layouts, strict=True):
        _draw_run(fig, picture, x0, size)
        x0 += lay.width
    return fig


def plot(runs: Sequence[RunData], out: str | os.PathLike[str], param: str | None = None) -> Path:
    """Write :func:`plot_figure` to ``out`` (png, svg, pdf, ... by its extension).

    Raises:
        InspectError: ``out`` cannot be written (its folder is missing or not writable, or its
            extension is not an image format matplotlib writes); the folder is not created.
    """
    fig = plot_figure(runs, param)
    out_path = Path(out)
    try:
        fig.savefig(out_path, dpi=DPI)
    except (OSError, ValueError) as exc:  # no such folder, no permission, unknown format
        raise InspectError(f"--plot {out_path}: cannot write it ({exc})") from exc
    return out_path
