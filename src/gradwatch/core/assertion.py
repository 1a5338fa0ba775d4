"""``assert_gradients``: a check that verified nothing fails the test, with the reason.

Both frameworks' ``assert_gradients`` end here. ``fail`` raises; ``inconclusive`` raises too
(which entries could not be judged and why) unless ``allow_inconclusive=True``. Frames of this
module are hidden from pytest tracebacks (``__tracebackhide__``), so a failing test points at the
user's call.
"""

from __future__ import annotations

from gradwatch.core.verdict import MIN_CONCLUSIVE_FRACTION
from gradwatch.errors import GradientCheckError
from gradwatch.report import CheckReport

__all__ = ["inconclusive_reason", "raise_unless_verified"]

#: Inconclusive entries named in the message (the report printed below it has the rest).
NAMED_ENTRIES = 8

_WHY = {
    "kink": "the one-sided slopes disagree (a kink: ReLU, max, abs, a clamp at the point)",
    "zero": "autodiff and finite differences are both below the finite-difference resolution",
}


def inconclusive_reason(report: CheckReport) -> str:
    """Why a report could not judge: its ``unchecked``/``nonfinite`` events, or its entries.

    Example:
        >>> from gradwatch.report import EntryResult
        >>> r = CheckReport(None, "inconclusive", None,
        ...                 (EntryResult("w", (0,), 0.0, 0.0, None, "zero"),), (),
        ...                 "coordinate", "float64", 1e-3, 3, 0.0)
        >>> print(inconclusive_reason(r))
        0 of 1 entries were conclusive (a verdict needs at least 25%); inconclusive: w[0] zero (autodiff and finite differences are both below the finite-difference resolution)
    """
    said = [f"{e.kind}: {e.message}" for e in report.events if e.kind in ("unchecked", "nonfinite")]
    if not report.results:
        return "; ".join(said) or "no entry was checked"
    ok = sum(r.status == "ok" for r in report.results)
    odd = [r for r in report.results if r.status in _WHY]
    named = ", ".join(
        r.param + ("" if r.index is None else str(list(r.index))) + f" {r.status}"
        for r in odd[:NAMED_ENTRIES]
    )
    if len(odd) > NAMED_ENTRIES:
        named += f" and {len(odd) - NAMED_ENTRIES} more"
    why = "; ".join(f"{s}: {text}" for s, text in _WHY.items() if any(r.status == s for r in odd))
    counts = (
        f"{ok} of {len(report.results)} entries were conclusive (a verdict needs at least "
        f"{MIN_CONCLUSIVE_FRACTION:.0%})"
    )
    if len({r.status for r in odd}) == 1:
        named = f"{named} ({_WHY[odd[0].status]})"
        why = ""
    parts = [*said, counts, f"inconclusive: {named}" if named else "", why]
    return "; ".join(p for p in parts if p)


def raise_unless_verified(report: CheckReport, *, allow_inconclusive: bool = False) -> CheckReport:
    """Return ``report`` if it passed; raise :class:`GradientCheckError` if it verified nothing.

    Raises:
        GradientCheckError: On ``fail``; on ``inconclusive`` unless ``allow_inconclusive``. The
            report is attached (``.report``) and printed in the message.

    Example:
        >>> r = CheckReport(None, "inconclusive", None, (), (), "coordinate", "float64", 1e-3, 0, 0.0)
        >>> raise_unless_verified(r, allow_inconclusive=True).verdict
        'inconclusive'
    """
    __tracebackhide__ = True
    if report.verdict == "fail":
        raise GradientCheckError(f"gradient check failed\n{report}", report=report)
    if report.verdict == "inconclusive" and not allow_inconclusive:
        raise GradientCheckError(
            f"gradient check inconclusive, so nothing was verified: {inconclusive_reason(report)}. "
            f"Check another batch or seed (coordinates away from kinks, with a gradient), or pass "
            f"allow_inconclusive=True to accept it\n{report}",
            report=report,
        )
    return report
