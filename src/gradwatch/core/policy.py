"""What to do about an event: ``ignore``, ``warn``, ``halt`` or ``raise``.

The callbacks collect a step's events, call :func:`dispatch`, and act on the returned
:class:`Action` through their framework (``halt`` → stop after this step; ``raise`` → flush the
writers, then raise the error it carries).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from gradwatch.errors import GradientCheckError, GradientHealthWarning
from gradwatch.report import CheckReport, GradientEvent

__all__ = ["POLICIES", "Action", "dispatch", "policy_for", "validate_policy"]

logger = logging.getLogger("gradwatch")

Policy = Literal["ignore", "warn", "halt", "raise"]
POLICIES: tuple[str, ...] = ("ignore", "warn", "halt", "raise")


def validate_policy(argument: str, value: object) -> Policy:
    """Return ``value`` if it is a policy, else raise ``ValueError`` naming ``argument``.

    Example:
        >>> validate_policy("on_vanish", "halt")
        'halt'
        >>> validate_policy("on_vanish", "stop")
        Traceback (most recent call last):
        ...
        ValueError: on_vanish must be one of 'ignore', 'warn', 'halt', 'raise'; got 'stop'
    """
    if value not in POLICIES:
        allowed = ", ".join(repr(p) for p in POLICIES)
        raise ValueError(f"{argument} must be one of {allowed}; got {value!r}")
    return value  # type: ignore[return-value]


def policy_for(event: GradientEvent, policies: Mapping[str, Policy]) -> Policy:
    """The policy governing an event; ``on_mismatch`` governs ``mismatch`` and ``disconnected``.

    ``unchecked`` (a check that could not run) always warns: it never halts or raises, whatever
    the policies say, and it is never silent.

    Example:
        >>> e = GradientEvent(1, "disconnected", "w", 1.0, 1e-3, "cut")
        >>> policy_for(e, {"on_mismatch": "raise"})
        'raise'
        >>> u = GradientEvent(1, "unchecked", "global", float("nan"), float("nan"), "no loss")
        >>> policy_for(u, {"on_mismatch": "raise"})
        'warn'
    """
    if event.kind == "unchecked":
        return "warn"
    key = {
        "mismatch": "on_mismatch",
        "disconnected": "on_mismatch",
        "vanishing": "on_vanish",
        "exploding": "on_explode",
        "nonfinite": "on_nonfinite",
    }[event.kind]
    return policies.get(key, "warn")


@dataclass(frozen=True)
class Action:
    """The strongest action a set of events calls for.

    Attributes:
        halt: Stop training cleanly after the current step.
        error: Raise this (after flushing writers); ``None`` when nothing asks to raise.
    """

    halt: bool = False
    error: GradientCheckError | None = None

    def merged(self, other: Action) -> Action:
        """Both actions at once: halt if either halts, the first error if any.

        Example:
            >>> Action(halt=True).merged(Action()).halt
            True
        """
        return Action(halt=self.halt or other.halt, error=self.error or other.error)


def dispatch(
    events: Iterable[GradientEvent],
    policies: Mapping[str, Policy],
    report: CheckReport | None = None,
    *,
    announce: bool = True,
) -> Action:
    """Log every event, warn where the policy says so, and return the action to take.

    ``announce=False`` (the ranks other than zero) decides the same action and says nothing.

    Example:
        >>> e = GradientEvent(4, "exploding", "fc.weight", 5e3, 1e3, "too big")
        >>> dispatch([e], {"on_explode": "halt"}).halt
        True
    """
    halt = False
    error: GradientCheckError | None = None
    for event in events:
        policy = policy_for(event, policies)
        where = "" if event.param == "global" else f" in {event.param}"
        text = f"gradwatch: step {event.step}: {event.kind}{where}: {event.message}"
        if policy == "ignore":
            if announce:
                logger.info(text)
            continue
        if announce:
            logger.warning(text)
        if policy == "warn" and announce:
            warnings.warn(text, GradientHealthWarning, stacklevel=3)
        elif policy == "halt":
            halt = True
        elif policy == "raise" and error is None:
            error = GradientCheckError(text, report=report, event=event)
    return Action(halt=halt, error=error)
