"""The ``gradwatch`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch", description="Watch gradients while a model trains."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ins = sub.add_parser("inspect", help="summarise gradwatch / TensorBoard logs of a run")
    ins.add_argument("path", metavar="LOGDIR", help="a run folder or a tree of runs")
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ins.add_argument("--plot", metavar="FILE.png", help="write a PNG of norms and errors")
    ins.add_argument("--exit-zero", action="store_true", help="exit 0 even when events are found")
    ins.add_argument(
        "--run",
        metavar="PATTERN",
        help="keep runs whose relative path matches this glob (with '#': <folder>#<run id>)",
    )
    ins.add_argument("--param", metavar="REGEX", help="keep parameters matching this expression")
    ins.add_argument(
        "--events",
        choices=("grouped", "all"),
        default="grouped",
        help="list events grouped by kind, module and parameter (default), or all of them in full",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gradwatch`` and ``python -m gradwatch``; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from gradwatch.inspect.cli import run_inspect

    return run_inspect(args)
