"""Records of a localization: which module's own backward is wrong (:class:`LocalizationReport`).

A localization checks every module call on its own (see ``docs/how-it-works.md``): each module
gets a verdict, and the culprit is the innermost failing module — a failing module none of whose
checked descendants fails (a parent whose children all pass is itself the culprit: the bug is in
code of its own). Plain Python values only, like :mod:`gradwatch.report`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gradwatch.core.unchecked import unchecked_event
from gradwatch.core.verdict import LOCATE_ADVICE
from gradwatch.report import CheckReport, EntryResult, GradientEvent, Verdict, json_float

__all__ = [
    "INNER_SLOTS",
    "NEVER_CALLED",
    "ROOT",
    "LocalizationReport",
    "ModuleResult",
    "culprits",
    "failure_detail",
    "holder_patterns",
    "is_inside",
    "module_result",
    "module_verdict",
    "owner_of",
    "slot_name",
    "slot_phrase",
]

#: The name a localization gives the model itself (``named_modules`` calls it ``""``).
ROOT = "<model>"

#: How a skipped module that is never called as a module begins its reason (torch, Keras).
NEVER_CALLED = "never called as a"

#: Slot names holding the parameters of a module's submodules (torch, Keras).
INNER_SLOTS = ("<submodule parameters>", "<sublayer weights>")


def slot_phrase(slot: str) -> str:
    """How a message names a local check slot's gradient.

    Example:
        >>> slot_phrase("input"), slot_phrase("input[1]"), slot_phrase("<sublayer weights>")
        ('input gradient', 'gradient of input 1', "sublayers' weight gradient")
    """
    if slot == "input":
        return "input gradient"
    if slot.startswith("input["):
        return f"gradient of input {slot[6:-1]}"
    if slot == INNER_SLOTS[0]:
        return "submodules' parameter gradient"
    if slot == INNER_SLOTS[1]:
        return "sublayers' weight gradient"
    return f"{slot} gradient"


def owner_of(param: str) -> str:
    """The module a parameter belongs to, by its dotted name (the model's own: :data:`ROOT`).

    Example:
        >>> owner_of("block.conv.weight"), owner_of("logit_scale")
        ('block.conv', '<model>')
    """
    return param.rsplit(".", 1)[0] if "." in param else ROOT


def holder_patterns(
    holders: Sequence[tuple[str, bool]], include: bool
) -> tuple[list[str] | None, list[str] | None]:
    """``include``/``exclude`` on module names standing for patterns on tensor names, when a
    check must go module by module: ``holders`` are ``(module, holds a selected tensor)`` for
    each module holding tensors. With ``include`` given: the modules holding a selected tensor;
    otherwise: leave out the modules holding none.

    Example:
        >>> holder_patterns([("a", True), ("b", False)], include=True)
        (['^a$'], None)
        >>> holder_patterns([("a", True), ("b", False)], include=False)
        (None, ['^b$'])
    """
    if include:
        return [f"^{re.escape(n)}$" for n, chosen in holders if chosen], None
    return None, [f"^{re.escape(n)}$" for n, chosen in holders if not chosen] or None


def slot_name(module: str, slot: str) -> str:
    """The name a local check's slot gets in a report: a parameter's full name, or
    ``module:slot`` for an input and for the submodules' parameters.

    Example:
        >>> slot_name("block.conv", "weight"), slot_name("block.act", "input"), slot_name(ROOT, "bias")
        ('block.conv.weight', 'block.act:input', 'bias')
    """
    if slot.startswith("input") or slot in INNER_SLOTS:
        return f"{module}:{slot}"
    return slot if module == ROOT else f"{module}.{slot}"


def failure_detail(failed: Sequence[EntryResult]) -> str:
    """``its input gradient is off by 10%`` from a module's failing entries (worst per slot).

    Example:
        >>> e = EntryResult("input", None, 0.9, 1.0, 0.1, "mismatch")
        >>> failure_detail([e])
        'its input gradient is off by 10%'
    """
    worst: dict[str, EntryResult] = {}
    for e in failed:
        if e.param not in worst or (e.rel_error or 0) > (worst[e.param].rel_error or 0):
            worst[e.param] = e
    parts = []
    for slot, e in worst.items():
        phrase = slot_phrase(slot)
        if e.status == "disconnected" or e.analytic == 0.0:
            parts.append(
                f"its {phrase} is missing (autodiff gives none; finite differences {e.numeric:.3g})"
            )
        elif e.numeric == 0.0 or e.analytic / e.numeric < 0:
            parts.append(
                f"its {phrase} has the wrong sign or direction (autodiff {e.analytic:.3g}, "
                f"finite differences {e.numeric:.3g})"
            )
        else:
            parts.append(f"its {phrase} is off by {abs(e.analytic / e.numeric - 1):.0%}")
    return "; ".join(parts)


def module_result(name: str, type_name: str, reports: Sequence[CheckReport]) -> ModuleResult:
    """One module's result from the reports of its checked calls.

    Example:
        >>> from gradwatch.report import CheckReport
        >>> r = CheckReport(None, "pass", 1e-9, (), (), "directional", "float64", 1e-5, 3, 0.0)
        >>> module_result("head", "Dense", [r]).verdict
        'pass'
    """
    verdicts: list[Verdict] = [r.verdict for r in reports]
    errors = [r.max_rel_error for r in reports if r.max_rel_error is not None]
    failed = [e for r in reports for e in r.failed]
    return ModuleResult(
        name=name,
        type=type_name,
        verdict=module_verdict(verdicts),
        max_rel_error=max(errors) if errors else None,
        calls=len(reports),
        detail=failure_detail(failed),
        entries=tuple(
            replace(e, param=slot_name(name, e.param)) for r in reports for e in r.results
        ),
    )


@dataclass(frozen=True)
class ModuleResult:
    """The local check of one module, over every call of it that was checked.

    Attributes:
        name: The module's name in the model (``decoder.layers.1.activation``; the model itself
            is ``"<model>"``).
        type: Its class name.
        verdict: ``pass``, ``fail`` or ``inconclusive`` (fail if any call failed; pass if a call
            passed and none failed).
        max_rel_error: Worst conclusive relative error over its calls (``None`` if none was).
        calls: How many calls of it were checked (weight sharing: one per call).
        detail: What is wrong, when it failed (``its input gradient is off by 10%``).
        entries: Every direction checked, named by :func:`slot_name` (``block.act:input``,
            ``block.conv.weight``).
    """

    name: str
    type: str
    verdict: Verdict
    max_rel_error: float | None
    calls: int
    detail: str = ""
    entries: tuple[EntryResult, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "name": self.name,
            "type": self.type,
            "verdict": self.verdict,
            "max_rel_error": json_float(self.max_rel_error),
            "calls": self.calls,
            "detail": self.detail,
            "entries": [e.to_dict() for e in self.entries],
        }


def is_inside(inner: str, outer: str) -> bool:
    """Whether module ``inner`` lies strictly inside module ``outer``.

    Example:
        >>> is_inside("enc.layers.1", "enc"), is_inside("enc2", "enc"), is_inside("enc", ROOT)
        (True, False, True)
    """
    if inner == outer:
        return False
    return outer == ROOT or inner.startswith(outer + ".")


def culprits(
    results: Sequence[ModuleResult], inside: Mapping[str, Collection[str]] | None = None
) -> tuple[str, ...]:
    """Failing modules with no failing module inside them, in model order.

    ``inside`` maps a module's name to the names of the modules it contains (a module shared
    by two parents has one name, and lies inside both); by default containment is read from the
    dotted names.

    Example:
        >>> r = [ModuleResult("<model>", "Net", "fail", 0.1, 1),
        ...      ModuleResult("block", "Block", "fail", 0.1, 1),
        ...      ModuleResult("block.act", "Act", "fail", 0.1, 1),
        ...      ModuleResult("head", "Linear", "pass", 1e-9, 1)]
        >>> culprits(r)
        ('block.act',)
    """
    failing = [r.name for r in results if r.verdict == "fail"]

    def contains(outer: str, inner: str) -> bool:
        if inside is None:
            return is_inside(inner, outer)
        return inner != outer and inner in inside.get(outer, ())

    return tuple(n for n in failing if not any(contains(n, m) for m in failing))


def module_verdict(verdicts: Sequence[Verdict]) -> Verdict:
    """A module's verdict from its calls' verdicts.

    Example:
        >>> module_verdict(["pass", "fail"]), module_verdict(["pass", "inconclusive"])
        ('fail', 'pass')
    """
    if "fail" in verdicts:
        return "fail"
    return "pass" if "pass" in verdicts else "inconclusive"


@dataclass(frozen=True)
class LocalizationReport:
    """Which module's own backward is wrong.

    Attributes:
        culprit: The first innermost failing module in model order (``None`` when every checked
            module agrees with finite differences).
        culprits: Every innermost failing module (two bugs, two names).
        modules: Per-module results, in model order.
        skipped: ``(name, reason)`` for each module that could not be checked.
        evaluations: Module evaluations used (forward passes of single modules, not of the model).
        seconds: Wall-clock time.
        notes: Remarks a person should read.

    Example:
        >>> r = LocalizationReport(
        ...     culprit="act", culprits=("act",),
        ...     modules=(ModuleResult("act", "MyGELU", "fail", 0.1, 1, "its input gradient is off by 10%"),),
        ...     skipped=(), evaluations=3, seconds=0.01)
        >>> print(r)   # doctest: +NORMALIZE_WHITESPACE
        localization: the backward of act (MyGELU) is wrong: its input gradient is off by 10%
          module  type    verdict  max rel err  calls
          act     MyGELU  FAIL     0.1          1  <- culprit
        >>> r.to_dict()["culprit"]
        'act'
    """

    culprit: str | None
    culprits: tuple[str, ...]
    modules: tuple[ModuleResult, ...]
    skipped: tuple[tuple[str, str], ...]
    evaluations: int = 0
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def from_results(
        cls,
        results: Sequence[ModuleResult],
        skipped: Sequence[tuple[str, str]],
        inside: Mapping[str, Collection[str]],
        *,
        evaluations: int,
        started: float,
        notes: Sequence[str] = (),
    ) -> LocalizationReport:
        """The report of checked modules: culprits found with :func:`culprits` (``inside``: each
        module's checked submodules), time measured from ``started`` (``time.perf_counter()``)."""
        guilty = culprits(results, inside)
        return cls(
            culprit=guilty[0] if guilty else None,
            culprits=guilty,
            modules=tuple(results),
            skipped=tuple(skipped),
            evaluations=evaluations,
            seconds=time.perf_counter() - started,
            notes=tuple(notes),
        )

    def result(self, name: str) -> ModuleResult | None:
        """The result of the module called ``name`` (``None`` if it was not checked)."""
        return next((m for m in self.modules if m.name == name), None)

    @property
    def summary(self) -> str:
        """One sentence: the culprit and what is wrong with it, or that every module agrees."""
        found = self.result(self.culprit) if self.culprit is not None else None
        if found is None:
            if not self.modules:
                why = f" ({self.skipped[0][1]})" if self.skipped else ""
                return f"no module could be checked{why}"
            if any(m.verdict == "fail" for m in self.modules):
                return "no single module is the culprit"
            unsure = sum(m.verdict == "inconclusive" for m in self.modules)
            if unsure:
                agree = len(self.modules) - unsure
                return (
                    f"no module's backward was shown wrong: {agree} agree with finite "
                    f"differences, {unsure} inconclusive"
                )
            return f"every checked module's backward agrees with finite differences ({len(self.modules)} modules)"
        text = _culprit_sentence(found)
        others = [c for c in self.culprits if c != found.name]
        return text + (f" (also: {', '.join(others)})" if others else "")

    def annotate(self, events: Sequence[GradientEvent]) -> list[GradientEvent]:
        """``mismatch``/``disconnected`` events with the culprit as their ``module``, named first
        in their message (other events, and all of them when there is no culprit, unchanged).

        Example:
            >>> r = LocalizationReport("act", ("act",), (ModuleResult("act", "MyGELU", "fail",
            ...     0.1, 1, "its input gradient is off by 10%"),), ())
            >>> e = GradientEvent(0, "mismatch", "fc.weight", 0.1, 1e-3, "fc.weight is off")
            >>> [(x.module, x.message) for x in r.annotate([e])]   # doctest: +NORMALIZE_WHITESPACE
            [('act', 'the backward of act (MyGELU) is wrong: its input gradient is off by 10%;
              fc.weight is off')]
        """
        found = self.result(self.culprit) if self.culprit is not None else None
        if found is None:
            return list(events)
        lead = _culprit_sentence(found)
        return [
            replace(
                e, module=found.name, message=f"{lead}; {e.message.removesuffix(LOCATE_ADVICE)}"
            )
            if e.kind in ("mismatch", "disconnected")
            else e
            for e in events
        ]

    def as_check(
        self,
        *,
        rtol: float,
        step: int | None = None,
        dtype: str = "float64",
        notes: Sequence[str] = (),
        started: float | None = None,
    ) -> CheckReport:
        """This localization as a gradient check (``mode="modules"``).

        Its entries are every module's directions (named by :func:`slot_name`); each culprit
        gives one ``mismatch`` (``disconnected`` when a gradient is missing) event naming it as
        ``module``. Verdict: ``fail`` with a culprit, ``pass`` when a module passed and none
        failed, else ``inconclusive`` (with an ``unchecked`` event when no module could be
        checked at all). ``started`` (``time.perf_counter()``): the check's own start, so its
        ``seconds`` include what ran before the localization.

        Example:
            >>> from gradwatch.report import EntryResult
            >>> bad = EntryResult("act:input", None, 0.9, 1.0, 0.1, "mismatch")
            >>> r = LocalizationReport("act", ("act",), (ModuleResult("act", "MyGELU", "fail",
            ...     0.1, 1, "its input gradient is off by 10%", (bad,)),), ())
            >>> check = r.as_check(rtol=1e-3)
            >>> check.verdict, check.events[0].module, check.events[0].param
            ('fail', 'act', 'act:input')
        """
        entries = tuple(e for m in self.modules for e in m.entries)
        events: list[GradientEvent] = []
        for name in self.culprits:
            found = self.result(name)
            if found is None:
                continue
            bad = [e for e in found.entries if e.status in ("mismatch", "disconnected")]
            worst = max(bad, key=lambda e: e.rel_error or 0.0, default=None)
            missing = any(e.status == "disconnected" for e in bad)
            events.append(
                GradientEvent(
                    step=-1 if step is None else step,
                    kind="disconnected" if missing else "mismatch",
                    param=worst.param if worst is not None else name,
                    value=float(found.max_rel_error if found.max_rel_error is not None else 1.0),
                    threshold=rtol,
                    message=_culprit_sentence(found),
                    module=name,
                )
            )
        errors = [m.max_rel_error for m in self.modules if m.max_rel_error is not None]
        verdict: Verdict = "fail" if events else module_verdict([m.verdict for m in self.modules])
        extra = [*self.notes, *notes]
        # A module never called as one (MultiheadAttention's out_proj) is checked inside its
        # parent's check: not worth a note at every check.
        missed = [(n, why) for n, why in self.skipped if not why.startswith(NEVER_CALLED)]
        if missed:
            shown = "; ".join(f"{n}: {why}" for n, why in missed[:3])
            more = f" and {len(missed) - 3} more" if len(missed) > 3 else ""
            what = "1 module was" if len(missed) == 1 else f"{len(missed)} modules were"
            extra.append(f"{what} not checked ({shown}{more})")
        if not self.modules:
            events.append(unchecked_event(step, f"nothing was verified: {self.summary}"))
        return CheckReport(
            step=step,
            verdict=verdict,
            max_rel_error=max(errors) if errors else None,
            results=entries,
            events=tuple(events),
            mode="modules",
            dtype=dtype,
            rtol=rtol,
            evaluations=self.evaluations,
            seconds=self.seconds if started is None else time.perf_counter() - started,
            notes=tuple(extra),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "culprit": self.culprit,
            "culprits": list(self.culprits),
            "modules": [m.to_dict() for m in self.modules],
            "skipped": [list(s) for s in self.skipped],
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"localization: {self.summary}"]
        if self.modules:
            depth = _tree_depths([m.name for m in self.modules])
            names = [("  " * depth[m.name]) + m.name for m in self.modules]
            width = max(len("module"), *(len(n) for n in names))
            twidth = max(len("type"), *(len(m.type) for m in self.modules))
            lines.append(f"  {'module':<{width}}  {'type':<{twidth}}  verdict  max rel err  calls")
            for shown, m in zip(names, self.modules, strict=True):
                err = "-" if m.max_rel_error is None else f"{m.max_rel_error:.3g}"
                mark = "  <- culprit" if m.name in self.culprits else ""
                lines.append(
                    f"  {shown:<{width}}  {m.type:<{twidth}}  {m.verdict.upper():<7}  "
                    f"{err:<11}  {m.calls}{mark}"
                )
        for name, reason in self.skipped:
            lines.append(f"  skipped {name}: {reason}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def _culprit_sentence(found: ModuleResult) -> str:
    """``the backward of act (MyGELU) is wrong: its input gradient is off by 10%``."""
    text = f"the backward of {found.name} ({found.type}) is wrong"
    return text + (f": {found.detail}" if found.detail else "")


def _tree_depths(names: Sequence[str]) -> dict[str, int]:
    """Indentation of each listed module: the number of listed modules that contain it.

    A container never called itself (an ``nn.ModuleList``) is not listed, so its children sit at
    the depth of the container's parent, not under the sibling listed before them.

    Example:
        >>> _tree_depths(["<model>", "embed", "layers.0", "layers.0.act", "head"])
        {'<model>': 0, 'embed': 1, 'layers.0': 1, 'layers.0.act': 2, 'head': 1}
    """
    listed = set(names)
    depths = {}
    for name in names:
        if name == ROOT:
            depths[name] = 0
            continue
        parts = name.split(".")
        above = sum(".".join(parts[:k]) in listed for k in range(1, len(parts)))
        depths[name] = above + (1 if ROOT in listed else 0)
    return depths
