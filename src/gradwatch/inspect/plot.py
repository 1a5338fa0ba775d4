"""``--plot``: per run, a tensor × step heatmap of gradient RMS and a strip of checks per module.

Each run is one column of the figure (several runs: columns side by side, one file). On top, one
row per tensor, grouped under a bold header per module (``encoder.layers.3``, ``decoder``, ...), one
column per logged step, coloured by gradient RMS on a log scale; the cells where gradwatch raised a
vanishing, exploding or non-finite event are outlined and hatched; tensors that fail a check have
their name in red and, at the right of their row, what failed. Below, one row per module group and
a marker per check: the worst relative error of its tensors, green within ``rtol``, a red cross
above it, and at the right of the row how many checks failed and the worst error.

Labels never overlap: every text sits on its own row, and the row height and font size follow the
number of tensors (a 200-tensor run is a tall figure with small type, not a tangle); the texts
and sizes are computed in :mod:`~gradwatch.inspect.plot_layout`, drawn here.

Example:
    >>> from gradwatch.inspect.read import RunData
    >>> run = RunData("r", norms={"net.0.weight": {0: 0.5}}, meta={"shapes": {"net.0.weight": [4]}})
    >>> fig = plot_figure([run])
    >>> [im.get_array().shape for im in fig.axes[0].images]
    [(1, 1)]
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.inspect.plot_data import RunPicture, picture_of, shorten_left
from gradwatch.inspect.plot_layout import (
    ABOVE_STRIP_IN,
    BELOW_HEAT_IN,
    CBAR_IN,
    HEAT_IN,
    LABEL_CHARS,
    TOP_IN,
    Layout,
    Notes,
    group_labels,
    is_related,
    row_labels,
)
from gradwatch.inspect.read import InspectError, RunData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["check_output", "plot", "plot_figure"]

DPI = 100
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
    ax: Axes, p: RunPicture, notes: Notes, layout: Layout, where: tuple[list[float], list[float]]
) -> None:
    from matplotlib.transforms import blended_transform_factory

    headers, rows = where
    across = blended_transform_factory(ax.transAxes, ax.transData)
    font = max(layout.font, 4.0)
    show = layout.font >= 4.0
    ax.set_yticks(rows, row_labels(p) if show else [])
    ax.tick_params(axis="y", labelsize=font, length=0, pad=2)
    for row, tick in enumerate(ax.get_yticklabels()):
        if row in notes.failing:
            tick.set_color(_FAIL)
            tick.set_fontweight("bold")
    for index, (label, y) in enumerate(zip(group_labels(p), headers, strict=True)):
        related = any(is_related(m, p.groups[index].name) for m in p.modules)
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
    stray = [m for m in p.modules if not any(is_related(m, g.name) for g in p.groups)]
    if stray:
        parts.append("localized: " + ", ".join(shorten_left(m, LABEL_CHARS) for m in stray))
    return f"{p.name}: gradient {what} per tensor and step\n" + "; ".join(parts)


def _draw_heatmap(ax: Axes, p: RunPicture, notes: Notes, layout: Layout) -> tuple[Any, str]:
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


def _draw_strip(ax: Axes, p: RunPicture, notes: Notes, layout: Layout) -> None:
    """One row per module group, one marker per check; the notes say what failed."""
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    ax.set_title(
        f"worst relative error per check and module group: ● within rtol {p.rtol:g}, ✗ above",
        fontsize=9,
        loc="left",
    )
    ax.set_ylim(max(1, len(p.groups)) - 0.5, -0.5)
    ax.set_yticks(range(len(p.groups)), group_labels(p))
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
    notes = Notes.of(p)
    layout = Layout.of(p, notes)
    left = x0 + layout.label_in
    heat = _axes(fig, size, (left, TOP_IN, HEAT_IN, layout.heat_h))
    image, what = _draw_heatmap(heat, p, notes, layout)
    top = TOP_IN + layout.heat_h + BELOW_HEAT_IN
    cax = _axes(fig, size, (left, top, 0.4 * HEAT_IN, CBAR_IN))
    _draw_colorbar(fig, cax, image, what)
    top += CBAR_IN + ABOVE_STRIP_IN
    _draw_strip(_axes(fig, size, (left, top, HEAT_IN, layout.strip_h)), p, notes, layout)


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
    layouts = [Layout.of(p, Notes.of(p)) for p in pictures]
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
