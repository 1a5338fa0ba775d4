"""``mode="modules"`` and ``max_check_memory`` for :class:`~gradwatch.torch.checker.TorchChecker`.

A check in ``mode="modules"``, or of a model whose float64 copy would exceed ``max_check_memory``,
checks each module's own backward alone (:class:`~gradwatch.torch.localize.Localizer`) and turns
what it finds into a :class:`~gradwatch.CheckReport`. These functions take the checker: its
options, its float64 copy, and the verification of that copy against the model's own pass are
shared with the whole-model check.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradwatch import options as v
from gradwatch.core.finite_diff import tolerances_for
from gradwatch.localization import LocalizationReport, holder_patterns, is_inside, owner_of
from gradwatch.report import CheckReport, Verdict
from gradwatch.torch.evaluate import host_rng_preserved
from gradwatch.torch.localize import Localizer, float64_bytes, free_memory
from gradwatch.torch.twin import Twin, named_trainable

if TYPE_CHECKING:
    from gradwatch.torch.checker import TorchChecker

__all__ = ["check_modules", "too_large"]


def too_large(checker: TorchChecker) -> int | None:
    """The memory limit, when a float64 copy is not built yet and would exceed it."""
    if checker.torch_dtype != torch.float64 or checker._twin is not None:
        return None
    limit = checker.max_check_memory
    if limit is None:
        limit = free_memory(next(checker.model.parameters()).device)
    return limit if limit is not None and float64_bytes(checker.model) > limit else None


def check_modules(
    checker: TorchChecker,
    batch: Any,
    seed: int,
    step: int | None,
    started: float,
    limit: int | None,
) -> CheckReport:
    """Each module's own backward checked alone (``mode="modules"``, or — ``limit``, from
    :func:`too_large` — a model whose float64 copy would exceed it: then module by module)."""
    rtol = tolerances_for(np.dtype(np.float64), checker.rtol).rtol
    if limit is not None:
        found = _module_localizer(checker, None, limit).localize(batch, seed=seed)
        mode_note = []
        if checker.mode != "modules":
            mode_note.append(
                f"mode={checker.mode!r} needs the float64 copy of the whole model: each "
                f"module's own backward was checked instead (as mode='modules')"
                + (
                    "; include/exclude selected the modules that hold the selected parameters"
                    if checker.include or checker.exclude
                    else ""
                )
            )
        return found.as_check(rtol=rtol, step=step, notes=mode_note, started=started)
    twin = checker.twin()
    with host_rng_preserved():
        if not twin.in_place and not checker.copy_disagrees:
            _verify_copy(checker, twin, batch, seed)
        if checker.copy_disagrees:
            return _modules_fallback(checker, batch, seed, step, started)
        if checker._localizer is None:
            checker._localizer = _module_localizer(checker, twin, None)
        found = checker._localizer.localize(batch, seed=seed)
        report = found.as_check(
            rtol=rtol, step=step, notes=checker._precision_note(), started=started
        )
        outside = _uncovered(checker, found)
        if not outside:
            return report
        # Parameters no checked module holds (the root's own, when loss_fn calls submodules and
        # never the model; a module that could not run alone): checked on the whole loss.
        rng = np.random.default_rng([checker.seed, seed, 1])
        judge = checker.judge(outside, "directional", rng, step, started, num_params=len(outside))
        whole = checker._on_copy(twin, batch, seed, judge, verify=False)
    return (
        report if whole is None else _with_whole(report, whole, [checker.names[i] for i in outside])
    )


def _uncovered(checker: TorchChecker, found: LocalizationReport) -> list[int]:
    """Indices of the checked parameters whose module was selected but lies in no checked
    module (so no local check saw them)."""
    checked = [m.name for m in found.modules]
    out = []
    for i, name in enumerate(checker.names):
        owner = owner_of(name)
        if not v.selected(owner, *checker.module_patterns):
            continue
        if not any(owner == c or is_inside(owner, c) for c in checked):
            out.append(i)
    return out


def _with_whole(local: CheckReport, whole: CheckReport, names: list[str]) -> CheckReport:
    """The local checks' report with the whole-loss check of the parameters they did not see."""
    verdicts = [whole.verdict] + ([local.verdict] if local.results else [])
    verdict: Verdict = (
        "fail" if "fail" in verdicts else "pass" if set(verdicts) == {"pass"} else "inconclusive"
    )
    errors = [e for e in (local.max_rel_error, whole.max_rel_error) if e is not None]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    what = "1 tensor lies" if len(names) == 1 else f"{len(names)} tensors lie"
    note = (
        f"{what} in no checked module ({shown}; code outside modules uses "
        f"them, or their module could not be checked alone): they were checked along a random "
        f"direction of the whole loss"
    )
    return replace(
        local,
        verdict=verdict,
        max_rel_error=max(errors) if errors else None,
        results=local.results + whole.results,
        events=local.events + whole.events,
        evaluations=local.evaluations + whole.evaluations,
        seconds=max(local.seconds, whole.seconds),
        notes=(*local.notes, note, *whole.notes),
    )


def _module_selection(checker: TorchChecker) -> tuple[list[str] | None, list[str] | None]:
    """``include``/``exclude`` on module names: as given in ``mode="modules"``; otherwise (a
    model over ``max_check_memory``) the parameter patterns turned into the modules holding the
    selected parameters (``include`` given) or none of them (``exclude`` only)."""
    if checker.mode == "modules" or not (checker.include or checker.exclude):
        return (
            [p.pattern for p in checker.module_patterns[0]] or None,
            [p.pattern for p in checker.module_patterns[1]] or None,
        )
    chosen = {owner_of(n) for n in checker.names}
    every = sorted({owner_of(n) for n, _ in named_trainable(checker.model, [], [])})
    return holder_patterns([(o, o in chosen) for o in every], bool(checker.include))


def _module_localizer(checker: TorchChecker, twin: Twin | None, limit: int | None) -> Localizer:
    include, exclude = _module_selection(checker)
    return Localizer(
        checker.model,
        checker.loss_fn,
        seed=checker.seed,
        include=include,
        exclude=exclude,
        max_check_memory=limit,
        twin=twin,
        prepare=checker.prepare,
        rtol=checker.rtol,
        eps=checker.eps,
    )


def _verify_copy(checker: TorchChecker, twin: Twin, batch: Any, seed: int) -> None:
    """Compare the copy's loss and gradients with the model's own pass (sets
    :attr:`~gradwatch.torch.checker.TorchChecker.copy_disagrees` when the copy is not the model's
    function)."""
    with twin.synced() as module:
        evaluator = checker._evaluator(module, batch, seed, vectorize=False)
        try:
            evaluator.compute_base()
            checker.copy_agrees(evaluator, batch, seed)
        finally:
            evaluator.restore_buffers()


def _modules_fallback(
    checker: TorchChecker, batch: Any, seed: int, step: int | None, started: float
) -> CheckReport:
    """``mode="modules"`` on a model whose float64 copy is not its function: the whole
    model checked by coordinates, with float64 tensors swapped into the model itself."""
    rng = np.random.default_rng([checker.seed, seed])
    why = (
        "mode='modules' checks the modules of the float64 copy, which is not the model's "
        "function here, so this check fell back to mode='coordinate'"
    )
    every = list(range(len(checker.names)))
    judge = checker.judge(every, "coordinate", rng, step, started, lead=[why])
    return checker._on_model(batch, seed, judge, step, started)
