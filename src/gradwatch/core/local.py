"""One recorded module (layer) call checked alone, whatever the framework.

An adapter records, in one forward/backward, a module call's inputs and the cotangent its output
received, and presents ``<cotangent, module(inputs; own parameters)>`` as a :class:`LocalProblem`
(the engine's :class:`~gradwatch.core.problem.Problem` plus ``compute_base``). :func:`check_local`
judges it along one random direction per slot with the engine's usual tolerances (a second
direction for a slot whose first passed close to ``rtol``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from gradwatch.core.check import run_check
from gradwatch.core.problem import Problem
from gradwatch.report import CheckReport

__all__ = ["RECHECK_ABOVE", "LocalProblem", "check_local"]

#: A slot whose one direction passed with a relative error above this fraction of ``rtol`` gets
#: a second direction: a module's check has one direction per slot, and one can lie nearly
#: orthogonal to the error of a wrong backward (a normalisation dropping a term gave 9e-4 once,
#: under 1e-3); correct modules agree to about 1e-8.
RECHECK_ABOVE = 0.1


class LocalProblem(Problem, Protocol):
    """A module call as a check problem: ``compute_base`` fills the base value and gradients."""

    evaluations: int

    def compute_base(self) -> None:
        """Evaluate at the recorded point with autodiff gradients along every slot."""
        ...


def check_local(
    problem: LocalProblem,
    seed: Sequence[int],
    framework: str = "torch",
    *,
    rtol: float | None = None,
    eps: float | None = None,
) -> tuple[CheckReport | None, str, int]:
    """Check one call alone: its report, or why it was not checked (``""``: nothing to check).

    A forward that cannot be re-run alone is skipped with its reason, never raised.

    Args:
        problem: The recorded call.
        seed: Seed of the random directions (``(seed, module index, call index)``).
        framework: Whose words the messages use.
        rtol: Tolerance (``None``: the engine's float64 default).
        eps: Base step (``None``: the engine's default).

    Returns:
        ``(report, reason, evaluations)``.

    Example:
        >>> class Square:   # f(x) = <1, x**2> at x = (1, 2): gradient 2x
        ...     names, shapes, dtype, evaluations = ["input"], [(2,)], np.dtype("float64"), 0
        ...     x = np.array([1.0, 2.0])
        ...     def compute_base(self): self.base_loss = float(np.sum(self.x ** 2))
        ...     def values(self, t): return self.x.copy()
        ...     def gradient(self, t): return 2 * self.x
        ...     def losses(self, ps): return np.array([float(np.sum(p.value ** 2)) for p in ps])
        >>> report, reason, _ = check_local(Square(), (0, 0, 0))
        >>> report.verdict
        'pass'
    """
    if not problem.names:
        return None, "", 0
    try:
        problem.compute_base()
        report = run_check(
            problem,
            mode="directional",
            rng=np.random.default_rng(list(seed)),
            step=None,
            framework=framework,
            rtol=rtol,
            eps=eps,
            recheck_above=RECHECK_ABOVE,
        )
    except Exception as exc:  # a forward that cannot run alone is skipped, not fatal
        return (
            None,
            f"it could not be re-run alone ({type(exc).__name__}: {exc})",
            problem.evaluations,
        )
    return report, "", problem.evaluations
