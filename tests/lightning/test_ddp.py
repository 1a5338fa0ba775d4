"""DDP on two CPU processes (gloo): a bug visible on one rank only. Slow: marked, run in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_script.py"
pytestmark = pytest.mark.slow


def run(mode: str, tmp_path: Path) -> tuple[int, dict[int, dict]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=SCRIPT.parents[2],
    )
    out = {}
    for r in (0, 1):
        f = tmp_path / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote nothing\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        out[r] = json.loads(f.read_text())
    return proc.returncode, out


def test_halt_stops_both_ranks_at_the_same_step(tmp_path):
    code, ranks = run("halt", tmp_path)
    assert code == 0
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 1
    for r in (0, 1):
        kinds = {(e["kind"], e["param"]) for e in ranks[r]["events"]}
        assert ("mismatch", "net.0.weight") in kinds
    # Rank 0's own check passed; it learned of the failure from rank 1.
    assert ranks[0]["verdicts"] == ["pass"] and ranks[1]["verdicts"] == ["fail"]
    assert any("(rank 1)" in e["message"] for e in ranks[0]["events"])


def test_raise_ends_both_processes_without_hanging(tmp_path):
    code, ranks = run("raise", tmp_path)
    assert code != 0
    assert "mismatch" in ranks[0]["raised"] and "mismatch" in ranks[1]["raised"]


def test_default_schedule_is_agreed_across_ranks(tmp_path):
    code, ranks = run("budget", tmp_path)
    assert code == 0
    assert ranks[0]["checks"] == ranks[1]["checks"]
    assert ranks[0]["checks"][0] == 0
    assert ranks[0]["events"] == [] and ranks[1]["events"] == []
    # one reading of the free memory for both ranks: neither goes module by module alone
    assert ranks[0]["max_check_memory"] == ranks[1]["max_check_memory"] > 0


def test_nonfinite_halt_is_agreed_and_skips_the_update_on_both_ranks(tmp_path):
    code, ranks = run("nan", tmp_path)
    assert code == 0
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 5
    assert ranks[0]["finite"] and ranks[1]["finite"]
    for r in (0, 1):
        assert [(e["kind"], e["step"]) for e in ranks[r]["events"]] == [("nonfinite", 4)]


def test_mode_modules_names_the_module_buggy_on_one_rank_and_both_halt(tmp_path):
    code, ranks = run("modules", tmp_path)
    assert code == 0
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 1
    # rank 1's own check names the module; rank 0 passed and learned of it from rank 1
    assert ranks[1]["verdicts"] == ["fail"] and ranks[1]["modules"] == [["net.0"]]
    assert ranks[0]["verdicts"] == ["pass"]
    for r in (0, 1):
        assert any(e["kind"] == "mismatch" for e in ranks[r]["events"]), ranks[r]["events"]
