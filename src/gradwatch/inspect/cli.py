"""``gradwatch inspect``: read, print, plot; the exit status says whether events were found."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

from gradwatch.inspect.plot import check_output, plot
from gradwatch.inspect.read import InspectError, SkippedInput, load
from gradwatch.inspect.summary import has_events, print_tables, to_json

__all__ = ["run_inspect"]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def run_inspect(args: argparse.Namespace) -> int:
    """``gradwatch inspect``: 0 no events, 1 events found, 2 usage or input error."""
    try:
        if args.param is not None:
            try:
                re.compile(args.param)
            except re.error as exc:
                raise InspectError(
                    f"--param: invalid regular expression {args.param!r}: {exc}"
                ) from exc
        if args.plot:
            check_output(args.plot)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                runs = load(args.path, run=args.run)
            finally:
                for w in caught:
                    label = "" if issubclass(w.category, SkippedInput) else "warning: "
                    print(f"gradwatch: {label}{_one_line(w.message)}", file=sys.stderr)
        if args.json:
            print(json.dumps(to_json(runs, args.param), indent=2, allow_nan=False))
        else:
            print_tables(runs, args.param, events=getattr(args, "events", "grouped"))
        if args.plot:
            where = plot(runs, args.plot, args.param)
            if not args.json:
                print(f"plot written to {where}")
        sys.stdout.flush()
    except InspectError as exc:
        print(f"gradwatch: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gradwatch inspect ... | head`: the reader has gone, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 1 if has_events(runs, args.param) and not args.exit_zero else 0
