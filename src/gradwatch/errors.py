"""The one error type and the one warning category gradwatch raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwatch.report import CheckReport, GradientEvent

__all__ = ["GradientCheckError", "GradientHealthWarning"]


class GradientCheckError(RuntimeError):
    """Gradients failed a check, or a health policy said ``"raise"``.

    Attributes:
        report: The :class:`~gradwatch.CheckReport` behind the error, if a check raised it.
        event: The :class:`~gradwatch.GradientEvent` behind the error, if a health rule or a
            failing check inside a callback raised it.

    Example:
        >>> from gradwatch import GradientCheckError
        >>> err = GradientCheckError("gradient of fc.weight is wrong")
        >>> isinstance(err, RuntimeError), err.report is None
        (True, True)
    """

    def __init__(
        self,
        message: str,
        *,
        report: CheckReport | None = None,
        event: GradientEvent | None = None,
    ) -> None:
        super().__init__(message)
        self.report = report
        self.event = event


class GradientHealthWarning(UserWarning):
    """Warning category of the ``"warn"`` policy; filter it like any ``UserWarning``.

    Example:
        >>> import warnings
        >>> from gradwatch import GradientHealthWarning
        >>> warnings.simplefilter("ignore", GradientHealthWarning)
    """
