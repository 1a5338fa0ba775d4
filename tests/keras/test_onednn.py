"""Non-finite gradients are found from the gradients, with oneDNN on and off (a subprocess each:
``TF_ENABLE_ONEDNN_OPTS`` is read once per process). Slow: marked, run in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.watch.watcher import HEALTH_BLOCK

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "keras_nan_script.py"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("onednn", ["1", "0"], ids=["onednn-on", "onednn-off"])
def test_nan_batch_is_nonfinite_on_its_own_step_and_its_update_is_skipped(onednn, tmp_path):
    out = tmp_path / "out.json"
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "KERAS_BACKEND": "tensorflow"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=SCRIPT.parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["events"] == [["nonfinite", 6]]
    assert got["finite"]
    assert got["iterations"] == HEALTH_BLOCK - 1  # halted at the block read, one update skipped
