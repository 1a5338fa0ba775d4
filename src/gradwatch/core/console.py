"""What reaches the user's console: each event once, summarised, attributed to the user's code.

One channel: :mod:`warnings` (a :class:`~gradwatch.GradientHealthWarning`, or ``UserWarning`` for
what gradwatch had to skip), as Lightning's ``rank_zero_warn`` does, attributed to the first frame
outside gradwatch and the frameworks (the line of the user's ``trainer.fit`` / ``model.fit``), so
the warning points at code the user can read and Python's filters (``-W``, ``filterwarnings``)
apply as to any warning. The ``gradwatch`` logger gets one INFO record per event: it is not
printed unless logging is configured at INFO. Only rank zero announces (the caller decides).

Several events of one kind at one step are one line ("mismatch in 31 tensors of decoder.layers.1
(a, b, c and 28 more): …"); a check that fails again on tensors already reported says "still
failing" in one short line instead of repeating every tensor.

Example:
    >>> from gradwatch.report import GradientEvent
    >>> events = [GradientEvent(3, "mismatch", f"dec.l1.w{i}", 0.5, 1e-3, "wrong") for i in range(5)]
    >>> summary_line(events)
    'gradwatch: step 3: mismatch in 5 tensors of dec.l1 (dec.l1.w0, dec.l1.w1, dec.l1.w2 and 2 more): worst dec.l1.w0: wrong'
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Sequence
from types import FrameType

from gradwatch.errors import GradientHealthWarning
from gradwatch.report import GradientEvent

__all__ = ["SHOWN", "Console", "describe", "event_text", "summary_line", "user_warn"]

#: Tensors named in a summary line (the rest are counted).
SHOWN = 3
#: Modules whose frames are never blamed for a warning: gradwatch and the frameworks around it.
_FRAMEWORK_MODULES = (
    "gradwatch",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "keras",
    "tf_keras",
    "tensorflow",
    "torch",
    "jax",
    "jaxlib",
    "absl",
    "contextlib",
    "functools",
)
#: Kinds a check reports (they persist from check to check until the bug is fixed).
_CHECK_KINDS = ("mismatch", "disconnected")


def event_text(event: GradientEvent) -> str:
    """One event as one line.

    Example:
        >>> event_text(GradientEvent(4, "exploding", "fc.weight", 5e3, 1e3, "too big"))
        'gradwatch: step 4: exploding in fc.weight: too big'
    """
    where = "" if event.param == "global" else f" in {event.param}"
    return f"gradwatch: step {event.step}: {event.kind}{where}: {event.message}"


def _common_module(params: Sequence[str]) -> str:
    """The longest prefix the names share, written with their own separator (Keras variable
    paths use ``/``; ``""`` when none).

    Example:
        >>> _common_module(["a.b.w", "a.b.v"]), _common_module(["net/block/kernel", "net/block/bias"])
        ('a.b', 'net/block')
    """
    sep = "/" if all("/" in p for p in params) else "."
    parts = [p.replace("/", ".").split(".")[:-1] for p in params]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if any(x != level[0] for x in level):
            break
        common.append(level[0])
    return sep.join(common)


def _tensors(group: Sequence[GradientEvent], params: Sequence[str], listed: str = "") -> str:
    """``N tensors of enc.layers.1 (a, b)`` (the module they share), or for a localized failure
    ``N tensors (a, b), localized to enc.layers.1.act`` (the module whose backward is wrong: the
    tensors are not its own)."""
    names = f" ({listed})" if listed else ""
    localized = _module_of(group[0])
    if localized:
        return f"{len(params)} tensors{names}, localized to {localized}"
    module = _common_module(params)
    return f"{len(params)} tensors{f' of {module}' if module else ''}{names}"


def _module_of(event: GradientEvent) -> str | None:
    """The module a localized event names (events carry none until localization does)."""
    module = getattr(event, "module", None)
    return str(module) if module else None


def _named(params: Sequence[str]) -> str:
    shown = ", ".join(params[:SHOWN])
    return shown + (f" and {len(params) - SHOWN} more" if len(params) > SHOWN else "")


def _worst(events: Sequence[GradientEvent]) -> GradientEvent:
    def badness(e: GradientEvent) -> float:
        v = e.value
        return float("inf") if v != v else abs(v)  # NaN is the worst

    return max(events, key=badness)


def describe(events: Sequence[GradientEvent]) -> str:
    """Events of one kind at one step, without the step: how many tensors, where, the first few,
    and the message of the worst one.

    Example:
        >>> describe([GradientEvent(2, "vanishing", "fc.w", 1e-9, 1e-7, "too small")])
        'vanishing in fc.w: too small'
    """
    first = events[0]
    if len(events) == 1:
        where = "" if first.param == "global" else f" in {first.param}"
        return f"{first.kind}{where}: {first.message}"
    params = list(dict.fromkeys(e.param for e in events))
    worst = _worst(events)
    return (
        f"{first.kind} in {_tensors(events, params, _named(params))}: worst {worst.param}: "
        f"{worst.message}"
    )


def summary_line(events: Sequence[GradientEvent]) -> str:
    """Events of one kind at one step as one console line (see :func:`describe`).

    Example:
        >>> summary_line([GradientEvent(2, "vanishing", "fc.w", 1e-9, 1e-7, "too small")])
        'gradwatch: step 2: vanishing in fc.w: too small'
    """
    return f"gradwatch: step {events[0].step}: {describe(events)}"


def _groups(events: Iterable[GradientEvent]) -> list[list[GradientEvent]]:
    """Events grouped by (step, kind, localized module), in order of first appearance;
    ``unchecked`` events (each its own reason) and ``global`` ones stay alone."""
    groups: dict[object, list[GradientEvent]] = {}
    for i, e in enumerate(events):
        alone = e.kind == "unchecked" or e.param == "global"
        key: object = i if alone else (e.step, e.kind, _module_of(e))
        groups.setdefault(key, []).append(e)
    return list(groups.values())


def _user_frame() -> FrameType | None:
    """The innermost frame outside gradwatch and the frameworks (the outermost if none is)."""
    frame: FrameType | None = sys._getframe(1)
    last = frame
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if name.split(".")[0] not in _FRAMEWORK_MODULES:
            return frame
        last = frame
        frame = frame.f_back
    return last


def user_warn(message: str, category: type[Warning] = GradientHealthWarning) -> None:
    """``warnings.warn`` attributed to the user's code (the first frame outside gradwatch and
    the frameworks), so the warning points where the user called ``fit``.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     user_warn("gradwatch: hello")
        >>> caught[0].filename.endswith("gradwatch/core/console.py")
        False
    """
    frame = _user_frame()
    if frame is None:  # pragma: no cover - there is always a frame
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals = frame.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=str(module_globals.get("__name__", "")),
        registry=registry,
    )


class Console:
    """The console of one run: summarised warnings, "still failing" for a persistent check
    failure, and the one line of a halt.

    Example:
        >>> import warnings
        >>> c = Console()
        >>> bug = [GradientEvent(0, "mismatch", f"m.w{i}", 0.5, 1e-3, "wrong") for i in range(4)]
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     c.announce(bug)
        ...     c.announce([e.__class__(**{**e.to_dict(), "step": 9}) for e in bug])
        >>> [str(w.message)[:60] for w in caught]
        ['gradwatch: step 0: mismatch in 4 tensors of m (m.w0, m.w1, m', 'gradwatch: still failing at step 9: mismatch in the same 4 t']
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new run: nothing reported yet."""
        self._reported: dict[str, set[str]] = {}
        #: The module a localization named for a tensor's failure (later checks that are not
        #: localized say so too).
        self._culprit: dict[str, str] = {}
        self.halted = False

    def lines(self, events: Iterable[GradientEvent]) -> list[str]:
        """The console lines of these events (and remember which check failures were shown)."""
        out: list[str] = []
        for group in _groups(events):
            kind = group[0].kind
            if kind not in _CHECK_KINDS:
                out.append(summary_line(group))
                continue
            reported = self._reported.setdefault(kind, set())
            params = list(dict.fromkeys(e.param for e in group))
            new = [e for e in group if e.param not in reported]
            if new:
                line = summary_line(new)
                old = len(params) - len({e.param for e in new})
                if old:
                    line += f" ({old} more still failing)"
                out.append(line)
            else:
                worst = _worst(group)
                known = {self._culprit.get(p) for p in params}
                recalled = _module_of(group[0]) is None and len(known) == 1 and None not in known
                if len(params) > 1:
                    tensors = f"{len(params)} tensors" if recalled else _tensors(group, params)
                    what = f"the same {tensors}"
                    value = f"worst {worst.value:.3g} in {worst.param}"
                else:
                    what, value = params[0], f"{worst.value:.3g}"
                if recalled:
                    what += f", localized to {known.pop()} at an earlier check"
                out.append(
                    f"gradwatch: still failing at step {group[0].step}: {kind} in {what} "
                    f"(relative error {value})"
                )
            reported.update(params)
            self._culprit.update({e.param: e.module for e in group if e.module})
        return out

    def announce(self, events: Sequence[GradientEvent]) -> None:
        """Warn about these events, one line per group."""
        for line in self.lines(events):
            user_warn(line)

    def halt(
        self, step: int, reason: str | None, *, since: int | None = None, ended: bool = False
    ) -> None:
        """The one line of a halt (once per run): that gradwatch stopped training, when, why.

        ``since``: the step of the halting event, when it is not ``step`` (an episode judged a few
        steps later). ``ended``: training was already ending (the halting event was judged at the
        end), so nothing was stopped; the line says so.
        """
        if self.halted:
            return
        self.halted = True
        why = reason or "a stopping policy covers this step's gradients"
        if ended:
            at = f"step {since if since is not None else step}"
            user_warn(f"gradwatch: training ended before gradwatch could stop it at {at}: {why}")
            return
        seen = f" (seen at step {since})" if since is not None and since != step else ""
        user_warn(f"gradwatch stopped training at step {step}{seen}: {why}")
