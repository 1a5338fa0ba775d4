"""gradwatch: watch gradients while a model trains.

Trustworthy finite-difference gradient checks and gradient-health monitoring for PyTorch,
Lightning and Keras. ``import gradwatch`` imports no ML framework; the adapters live in
``gradwatch.torch``, ``gradwatch.lightning`` and ``gradwatch.keras``.

Example:
    >>> import gradwatch
    >>> issubclass(gradwatch.GradientCheckError, RuntimeError)
    True
"""

from gradwatch.errors import GradientCheckError, GradientHealthWarning
from gradwatch.localization import LocalizationReport, ModuleResult
from gradwatch.report import CheckReport, EntryResult, GradientEvent

__all__ = [
    "CheckReport",
    "EntryResult",
    "GradientCheckError",
    "GradientEvent",
    "GradientHealthWarning",
    "LocalizationReport",
    "ModuleResult",
    "__version__",
]

__version__ = "0.1.0"
