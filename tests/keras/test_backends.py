"""The core Keras checks on Keras' torch and JAX backends, each in its own process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras not installed"),
]


def run(backend: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{backend}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "keras_backend_script.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_core_checks_on_backend(backend, tmp_path):
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        pytest.skip("jax not installed")
    result = run(backend, tmp_path)
    assert result["backend"] == backend
    for name, r in result["healthy"].items():
        assert r["verdict"] == "pass", (name, r)
        assert r["unchanged"], name
    assert result["bug"]["verdict"] == "fail"
    assert ["disconnected", "sequential_1/cut/kernel"] in result["bug"]["events"] or any(
        kind == "disconnected" and param.endswith("cut/kernel")
        for kind, param in result["bug"]["events"]
    )
    assert result["callback"]["verdicts"] == ["pass", "pass"]
    assert result["callback"]["steps"] == [1, 3]
    assert result["callback"]["norms_logged"] is (backend == "torch")
    if backend == "torch":
        # The guard: the NaN batch's update skipped, fit halted on its step.
        assert result["nan"]["events"] == [["nonfinite", 3]]
        assert result["nan"]["finite"] and result["nan"]["iterations"] == 2
