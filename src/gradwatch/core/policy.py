"""What to do about an event: ``ignore``, ``warn``, ``halt`` or ``raise``.

The callbacks collect a step's events, call :func:`dispatch`, and act on the returned
:class:`Action` through their framework (``halt`` → stop after this step; ``raise`` → flush the
writers, then raise the error it carries).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from gradwatch.core.console import Console, describe, event_text
from gradwatch.errors import GradientCheckError
from gradwatch.report import CheckReport, GradientEvent

__all__ = [
    "POLICIES",
    "Action",
    "Policy",
    "dispatch",
    "policy_argument",
    "policy_for",
    "validate_policy",
]

logger = logging.getLogger("gradwatch")

Policy = Literal["ignore", "warn", "halt", "raise"]
POLICIES: tuple[str, ...] = ("ignore", "warn", "halt", "raise")
#: The policies that stop training.
STOPPING: tuple[str, ...] = ("halt", "raise")


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
    return policies.get(policy_argument(event), "warn")


def policy_argument(event: GradientEvent) -> str:
    """The argument whose policy governs an event (``"on_mismatch"`` for ``disconnected``)."""
    return {
        "mismatch": "on_mismatch",
        "disconnected": "on_mismatch",
        "vanishing": "on_vanish",
        "exploding": "on_explode",
        "nonfinite": "on_nonfinite",
    }.get(event.kind, "policy")


@dataclass(frozen=True)
class Action:
    """The strongest action a set of events calls for.

    Attributes:
        halt: Stop training cleanly after the current step.
        error: Raise this (after flushing writers); ``None`` when nothing asks to raise.
        reason: Why it halts, one line (the halting events and their policy); ``None`` when it
            does not halt or another rank asked to.
        since: The step of the first halting event (``None`` with no reason).
    """

    halt: bool = False
    error: GradientCheckError | None = None
    reason: str | None = None
    since: int | None = None

    def merged(self, other: Action) -> Action:
        """Both actions at once: halt if either halts, the first error if any.

        Example:
            >>> Action(halt=True).merged(Action()).halt
            True
        """
        return Action(
            halt=self.halt or other.halt,
            error=self.error or other.error,
            reason=self.reason or other.reason,
            since=self.since if self.reason else other.since,
        )


def dispatch(
    events: Iterable[GradientEvent],
    policies: Mapping[str, Policy],
    report: CheckReport | None = None,
    *,
    announce: bool = True,
    console: Console | None = None,
) -> Action:
    """Warn where the policy says so (once, summarised) and return the action to take.

    Every event is logged once at INFO on the ``gradwatch`` logger (not printed unless logging
    is configured); the console sees one warning per group of ``warn`` events (see
    :mod:`~gradwatch.core.console`). ``halt`` events are not warned about: the action carries
    them as its ``reason``, which the callback prints in the one line of the halt. ``raise``
    events become the error. ``announce=False`` (the ranks other than zero) decides the same
    action and says nothing.

    Example:
        >>> e = GradientEvent(4, "exploding", "fc.weight", 5e3, 1e3, "too big")
        >>> action = dispatch([e], {"on_explode": "halt"})
        >>> action.halt, action.reason
        (True, "exploding in fc.weight: too big (on_explode='halt')")
    """
    error: GradientCheckError | None = None
    warned: list[GradientEvent] = []
    halting: list[GradientEvent] = []
    for event in events:
        policy = policy_for(event, policies)
        text = event_text(event)
        if announce:
            logger.info(text)
        if policy == "warn":
            warned.append(event)
        elif policy == "halt":
            halting.append(event)
        elif policy == "raise" and error is None:
            error = GradientCheckError(text, report=report, event=event)
    if announce and warned:
        (console if console is not None else Console()).announce(warned)
    reason = None
    if halting:
        key = (halting[0].step, halting[0].kind)
        first = [
            e for e in halting if (e.step, e.kind) == key
        ]  # the first step's kind, in one line
        rest = len(halting) - len(first)
        more = f"; and {rest} more halting event{'s' if rest > 1 else ''}" if rest else ""
        reason = f"{describe(first)}{more} ({policy_argument(halting[0])}='halt')"
    return Action(
        halt=bool(halting),
        error=error,
        reason=reason,
        since=halting[0].step if halting else None,
    )
