"""What reaches the console: each event once, summarised, attributed to the user; a halt in one line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gradwatch import GradientEvent, GradientHealthWarning
from gradwatch.core.console import Console, summary_line
from gradwatch.core.policy import dispatch

ROOT = Path(__file__).resolve().parents[2]


def run_script(what: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.pop("PYTHONWARNINGS", None)  # Python's default filters, as a user's run has them
    return subprocess.run(
        [sys.executable, "-m", "tests.scripts.console_script", what],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


def test_a_planted_bug_is_printed_once_and_then_still_failing():
    pytest.importorskip("lightning")
    done = run_script("bug")
    assert "events: [('mismatch', 0), ('mismatch', 2), ('mismatch', 4)]" in done.stdout
    err = done.stderr
    # The bug's text, once: not a log record beside the warning, not again at each check.
    assert err.count("finite differences give") == 1, err
    assert err.count("gradwatch: step 0: mismatch in net.0.weight:") == 1, err
    assert err.count("gradwatch: still failing at step 2: mismatch in net.0.weight") == 1, err
    assert err.count("gradwatch: still failing at step 4: mismatch in net.0.weight") == 1, err
    # Attributed to the user's fit line, not to a file inside gradwatch or Lightning.
    lines = [line for line in err.splitlines() if "GradientHealthWarning" in line]
    assert len(lines) == 3, err
    assert all(line.startswith(str(ROOT / "tests/scripts/console_script.py")) for line in lines)
    assert "WARNING" not in err and "/gradwatch/" not in "".join(lines)


def test_a_halt_is_one_line_saying_gradwatch_stopped_training():
    pytest.importorskip("lightning")
    done = run_script("halt")
    assert "events: [('nonfinite', 3)]" in done.stdout
    halts = [line for line in done.stderr.splitlines() if "stopped training" in line]
    assert len(halts) == 1, done.stderr
    assert "gradwatch stopped training at step 3: nonfinite: gradients of 6 tensor(s)" in halts[0]
    assert halts[0].endswith("(on_nonfinite='halt')")
    assert done.stderr.count("NaN or inf") == 1


def events(n: int, step: int = 5, kind: str = "mismatch") -> list[GradientEvent]:
    return [
        GradientEvent(step, kind, f"decoder.layers.1.t{i}.weight", 0.5 + i, 1e-3, f"bad {i}")
        for i in range(n)
    ]


def test_31_failing_tensors_are_one_line_then_one_still_failing_line(caplog):
    console = Console()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING, logger="gradwatch"):
            dispatch(events(31), {"on_mismatch": "warn"}, console=console)
            dispatch(events(31, step=40), {"on_mismatch": "warn"}, console=console)
    assert not caplog.records  # nothing at WARNING: Python's last-resort handler prints nothing
    first, again = (str(w.message) for w in caught)
    assert first.startswith(
        "gradwatch: step 5: mismatch in 31 tensors of decoder.layers.1 (decoder.layers.1.t0.weight, "
        "decoder.layers.1.t1.weight, decoder.layers.1.t2.weight and 28 more): worst "
        "decoder.layers.1.t30.weight: bad 30"
    )
    assert again == (
        "gradwatch: still failing at step 40: mismatch in the same 31 tensors of decoder.layers.1 "
        "(relative error worst 30.5 in decoder.layers.1.t30.weight)"
    )
    assert all(issubclass(w.category, GradientHealthWarning) for w in caught)
    assert all(w.filename == __file__ for w in caught)  # the caller's frame, not gradwatch's


def test_events_are_logged_at_info_only(caplog):
    with warnings.catch_warnings(record=True), caplog.at_level(logging.DEBUG, logger="gradwatch"):
        warnings.simplefilter("always")
        dispatch(events(2), {"on_mismatch": "warn"})
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]


def test_halting_events_are_the_reason_not_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action = dispatch(events(3, kind="exploding"), {"on_explode": "halt"})
    assert not caught
    assert action.halt and action.since == 5
    assert action.reason is not None and action.reason.startswith(
        "exploding in 3 tensors of decoder.layers.1"
    )
    assert action.reason.endswith("(on_explode='halt')")


def test_a_localized_failure_is_not_said_to_be_of_the_tensors_module():
    # The tensors of net.0 fail because net.1's backward is wrong: "of net.1" would misname
    # them, and the later unlocalized "still failing" line would name another module.
    bug = [
        GradientEvent(
            0, "mismatch", f"net.0.{p}", 0.1, 1e-3, "the backward of net.1 (Act)", "net.1"
        )
        for p in ("weight", "bias")
    ]
    (first,) = Console().lines(bug)
    assert "mismatch in 2 tensors (net.0.weight, net.0.bias), localized to net.1: worst" in first


def test_keras_variable_paths_keep_their_separator():
    events = [GradientEvent(0, "mismatch", f"net/block/dense/{p}", 0.1, 1e-3, "off") for p in "kb"]
    assert "2 tensors of net/block/dense (" in summary_line(events)


def test_a_later_unlocalized_failure_recalls_the_module_localized_before():
    def bug(step, module):
        return [
            GradientEvent(step, "mismatch", f"net.0.{p}", 0.1, 1e-3, "off", module)
            for p in ("weight", "bias")
        ]

    console = Console()
    console.lines(bug(0, "net.2"))
    (again,) = console.lines(bug(25, None))  # later checks localize only within the budget
    assert again.startswith("gradwatch: still failing at step 25: mismatch in the same 2 tensors")
    assert "2 tensors, localized to net.2 at an earlier check (relative error" in again
