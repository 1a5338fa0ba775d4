import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradwatch
from gradwatch.cli import main


def test_import_gradwatch_imports_no_ml_framework():
    code = (
        "import sys, gradwatch, gradwatch.core.check, gradwatch.core.health, gradwatch.cli;"
        "print(','.join(m for m in ('torch','tensorflow','keras','lightning','jax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names():
    for name in (
        "GradientCheckError",
        "GradientHealthWarning",
        "CheckReport",
        "EntryResult",
        "GradientEvent",
    ):
        assert name in gradwatch.__all__ and hasattr(gradwatch, name)
    assert issubclass(gradwatch.GradientHealthWarning, UserWarning)


def test_cli_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["inspect"]) == 2
    assert main(["frobnicate"]) == 2


def test_python_dash_m_runs():
    out = subprocess.run(
        [sys.executable, "-m", "gradwatch", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "inspect" in out.stdout


# --- extras: one per backend; a missing framework names the extra that installs it ---------------


def _extras():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _names(requirements):
    import re

    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0] for r in requirements}


def test_keras_extra_installs_keras_only_and_tensorflow_extra_adds_tensorflow_cpu():
    extras = _extras()
    assert _names(extras["keras"]) == {"keras"}
    assert _names(extras["tensorflow"]) == {"keras", "tensorflow-cpu"}
    # CI installs ".[dev]", which must still bring every framework the tests use.
    assert {"torch", "lightning", "keras", "tensorflow-cpu"} <= _names(extras["all"])
    assert "gradwatch[all]" in extras["dev"] and "jax" in _names(extras["dev"])


@pytest.mark.parametrize(
    ("hidden", "adapter", "extra"),
    [
        ("keras", "keras", "keras"),
        ("tensorflow", "keras", "tensorflow"),
        ("lightning", "lightning", "lightning"),
        ("torch", "lightning", "lightning"),
    ],
)
def test_a_missing_framework_names_its_extra(hidden, adapter, extra):
    code = (
        f"import sys; sys.modules[{hidden!r}] = None\n"
        f"try:\n    import gradwatch.{adapter}\n"
        f"except ModuleNotFoundError as e:\n    print(e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    ).stdout
    assert f"{hidden} is not installed (gradwatch.{adapter} needs it)" in out
    assert f'pip install "gradwatch[{extra}]"' in out
