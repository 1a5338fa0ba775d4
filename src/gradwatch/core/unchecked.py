"""``unchecked``: a gradient check that could not run (or could not judge), said out loud.

A check that cannot run must never look like a clean run. Every place that skips a check builds
its event here — the reason and the fix in one sentence — and the watcher writes it to every sink
like any other event. :func:`~gradwatch.core.policy.policy_for` makes it always warn: it never
halts or raises, whatever ``on_mismatch`` says.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradwatch.core.vocabulary import vocabulary
from gradwatch.report import CheckReport, GradientEvent

__all__ = ["event_report", "no_check_message", "unchecked_event", "unchecked_report"]


def unchecked_event(step: int | None, message: str, param: str = "global") -> GradientEvent:
    """An ``unchecked`` event: nothing was verified, for the reason (and with the fix) given.

    ``value`` and ``threshold`` are NaN: nothing was measured.

    Example:
        >>> e = unchecked_event(3, "training_step returned None; return the loss")
        >>> e.kind, e.param, e.to_dict()["value"]
        ('unchecked', 'global', 'nan')
    """
    return GradientEvent(
        step=-1 if step is None else int(step),
        kind="unchecked",
        param=param,
        value=float("nan"),
        threshold=float("nan"),
        message=message,
    )


def no_check_message(steps: int, period: int | None, framework: str | None = None) -> str:
    """Why a run with checks enabled ends with no check, and what to do about it (in
    ``framework``'s words; ``None``: both standalone checks are named).

    Example:
        >>> no_check_message(10, 1000)
        'no gradient check ran in the 10 optimizer steps of this run (check_every_n_steps=1000 puts none of them on the schedule), so its gradients were not verified: pass check_every_n_steps=10 or less'
    """
    plural = "step" if steps == 1 else "steps"
    if period is not None:
        return (
            f"no gradient check ran in the {steps} optimizer {plural} of this run "
            f"(check_every_n_steps={period} puts none of them on the schedule), so its gradients "
            f"were not verified: pass check_every_n_steps={max(1, steps)} or less"
        )
    standalone = (
        vocabulary(framework).check_gradients
        if framework is not None
        else "gradwatch.torch.check_gradients / gradwatch.keras.check_gradients"
    )
    return (
        f"no gradient check ran in the {steps} optimizer {plural} of this run, so its gradients "
        f"were not verified: see the warnings above for why, or run {standalone} on one batch"
    )


def unchecked_report(
    *,
    step: int | None,
    message: str,
    mode: str,
    dtype: str,
    rtol: float,
    evaluations: int,
    seconds: float,
    notes: Sequence[str] = (),
) -> CheckReport:
    """An ``inconclusive`` report whose one event is ``unchecked``: nothing could be judged.

    Example:
        >>> r = unchecked_report(step=None, message="the copy is not the model; fix it",
        ...                      mode="coordinate", dtype="float64", rtol=1e-3, evaluations=2,
        ...                      seconds=0.0)
        >>> r.verdict, r.events[0].kind
        ('inconclusive', 'unchecked')
    """
    return event_report(
        unchecked_event(step, message),
        step=step,
        mode=mode,
        dtype=dtype,
        rtol=rtol,
        evaluations=evaluations,
        seconds=seconds,
        notes=notes,
    )


def event_report(
    event: GradientEvent,
    *,
    step: int | None,
    mode: str,
    dtype: str,
    rtol: float,
    evaluations: int,
    seconds: float,
    notes: Sequence[str] = (),
) -> CheckReport:
    """An ``inconclusive`` report that judged nothing and carries one event saying why
    (``unchecked``, or ``nonfinite`` from the engine)."""
    return CheckReport(
        step=step,
        verdict="inconclusive",
        max_rel_error=None,
        results=(),
        events=(event,),
        mode=mode,
        dtype=dtype,
        rtol=rtol,
        evaluations=evaluations,
        seconds=seconds,
        notes=tuple(notes),
    )
