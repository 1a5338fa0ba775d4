import subprocess
import sys

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
