"""``--plot``: one PNG with gradient size per layer and relative errors per check, per run."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradwatch.inspect.read import InspectError, RunData
from gradwatch.watch import tags

__all__ = ["check_output", "plot"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise InspectError("--plot needs matplotlib: pip install 'gradwatch[inspect]'") from exc
    return plt


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
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise InspectError(
            f"--plot {path}: unknown image format {path.suffix or '(no extension)'};"
            f" use one of {', '.join('.' + f for f in sorted(formats))}"
        )
    return path


def plot(runs: Sequence[RunData], out: str | os.PathLike[str], param: str | None = None) -> Path:
    """One PNG: per run a column with gradient size per layer (log scale) and relative errors.

    Raises:
        InspectError: ``out`` cannot be written (its folder is missing or not writable, or its
            extension is not an image format matplotlib writes); the folder is not created.
    """
    plt = _pyplot()
    pattern = re.compile(param) if param else None
    fig, axes = plt.subplots(2, len(runs), figsize=(9 * len(runs), 8), squeeze=False)
    for col, run in enumerate(runs):
        ax, ax2 = axes[0][col], axes[1][col]
        shapes = run.meta.get("shapes", {})
        use_rms = bool(shapes)
        names = [
            n for n in run.norms if n != tags.GLOBAL_NAME and (pattern is None or pattern.search(n))
        ]
        cmap = plt.get_cmap("viridis", max(2, len(names)))
        for i, name in enumerate(names):
            series = run.norms[name]
            steps = sorted(series)
            scale = math.sqrt(max(1, math.prod(shapes.get(name, [1])))) if use_rms else 1.0
            vals = [series[s] / scale for s in steps]
            ax.plot(steps, vals, color=cmap(i), lw=1.2, label=name if len(names) <= 12 else None)
        if use_rms:
            ax.axhline(
                run.vanish_threshold,
                color="tab:blue",
                ls="--",
                lw=1,
                label="vanishing threshold",
            )
            ax.axhline(
                run.explode_threshold,
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
            if n != tags.MAX_NAME and (pattern is None or pattern.search(n))
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
        rtol = run.rtol
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
    try:
        fig.savefig(out_path, dpi=100)
    except (OSError, ValueError) as exc:  # no such folder, no permission, unknown format
        raise InspectError(f"--plot {out_path}: cannot write it ({exc})") from exc
    finally:
        plt.close(fig)
    return out_path
