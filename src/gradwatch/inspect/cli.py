"""``gradwatch inspect``: read, print, plot; the exit status says whether events were found."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings

from gradwatch.inspect.plot import plot
from gradwatch.inspect.read import InspectError, load
from gradwatch.inspect.summary import events_of, print_tables, to_json

__all__ = ["run_inspect"]


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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                runs = load(args.path, run=args.run)
            finally:
                for w in caught:
                    print(f"gradwatch: warning: {w.message}", file=sys.stderr)
        if args.json:
            print(json.dumps(to_json(runs, args.param), indent=2, allow_nan=False))
        else:
            print_tables(runs, args.param)
        if args.plot:
            where = plot(runs, args.plot, args.param)
            if not args.json:
                print(f"plot written to {where}")
    except InspectError as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    found = any(r.events for r in runs) if args.param is None else bool(events_of(runs, args.param))
    return 1 if found and not args.exit_zero else 0
