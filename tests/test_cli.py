"""The ``gradwatch`` command line: usage errors, help, and inspect's exit statuses."""

from __future__ import annotations

import subprocess
import sys

from gradwatch.cli import main
from gradwatch.watch.sinks import JsonlSink


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "inspect" in capsys.readouterr().err


def test_unknown_option_exits_2():
    assert main(["inspect", "x", "--nope"]) == 2


def test_help_exits_0(capsys):
    assert main(["inspect", "--help"]) == 0
    assert "--plot" in capsys.readouterr().out


def test_missing_path_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or folder" in err


def test_exit_status_says_whether_there_were_events(tmp_path, capsys):
    sink = JsonlSink(tmp_path / "gw.jsonl")
    sink.write_norms(1, {"w": 1.0}, 1.0)
    sink.close()
    assert main(["inspect", str(tmp_path)]) == 0
    from gradwatch import GradientEvent

    sink.write_event(GradientEvent(2, "nonfinite", "global", 1.0, 0.0, "NaN"))
    sink.close()
    assert main(["inspect", str(tmp_path)]) == 1
    assert main(["inspect", str(tmp_path), "--exit-zero"]) == 0


def test_python_dash_m_runs_the_same_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gradwatch", "inspect", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "gradwatch: error:" in proc.stderr
