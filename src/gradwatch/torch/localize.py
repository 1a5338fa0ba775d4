"""``localize``: from "gradients are wrong" to "this module's backward is wrong".

One forward/backward of the float64 copy (under the float64 guard, reseeded) records, for every
module call, its inputs, RNG state and buffers (a forward pre-hook) and the cotangent its output
received (a tensor hook on each output, attached by a forward hook: module backward hooks are
unreliable with in-place operations). Each call is then checked alone
(:class:`~gradwatch.torch.local_check.LocalProblem`): one random direction per input, per own
parameter and one for its submodules' parameters, judged by the check engine with the usual
tolerances, kinks and resolution floor. The culprit is the innermost failing module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwatch import options as v
from gradwatch.core.check import run_check
from gradwatch.localization import ROOT, LocalizationReport, ModuleResult, culprits, module_verdict
from gradwatch.report import CheckReport, Verdict
from gradwatch.torch.evaluate import Evaluator, LossFn, host_rng_preserved
from gradwatch.torch.local_check import (
    LocalProblem,
    ModuleCall,
    slot_phrase,
    tensor_leaves,
    with_leaves,
)
from gradwatch.torch.twin import Twin, cast_batch, named_trainable, unwrap_module

__all__ = ["Localizer", "localize"]


class _Recorder:
    """Forward hooks that record every call of the selected modules (removed by :meth:`close`)."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], devices: list[int]) -> None:
        self.calls: list[ModuleCall] = []
        self._open: dict[int, list[ModuleCall]] = {}
        self._devices = devices
        self._handles = []
        for name, m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            leaves = tensor_leaves((args, kwargs))
            needs = [t.is_floating_point() and t.requires_grad for t in leaves]
            clones = iter([t.detach().clone() for t in leaves])
            args_c, kwargs_c = with_leaves((args, kwargs), clones)
            call = ModuleCall(
                name=name,
                module=module,
                args=tuple(args_c),
                kwargs=dict(kwargs_c),
                needs_grad=needs,
                rng=torch.get_rng_state(),
                cuda_rng=[(i, torch.cuda.get_rng_state(i)) for i in self._devices],
                buffers=[b.detach().clone() for b in module.buffers()],
            )
            self._open.setdefault(id(module), []).append(call)
            self.calls.append(call)

        return hook

    def _post(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        stack = self._open.get(id(module))
        if not stack:
            return
        call = stack.pop()
        outputs = [t for t in tensor_leaves(output) if t.is_floating_point()]
        for position, t in enumerate(outputs):
            if t.requires_grad:
                t.register_hook(call.store(position))  # type: ignore[no-untyped-call]
                call.outputs += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Localizer:
    """A reusable localization of one module (the Lightning callback keeps one).

    Args:
        model: Any ``torch.nn.Module`` (``torch.compile`` and DDP wrappers are unwrapped).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
        seed: Seed of the directions and of the recording pass's RNG.
        include: Regular expression(s) on module names: check only matching modules.
        exclude: Regular expression(s) on module names: skip matching modules.
        max_check_memory: Bytes the checks may use (``None``: derived from free memory).
            Module-by-module checking is not implemented yet: a model whose float64 copy exceeds
            it is still checked whole, and the report says so.
        twin: The float64 copy to compute on (the callback shares its checker's).
        prepare: Called as ``prepare(model, twin)`` once a twin is built here.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        max_check_memory: int | None = None,
        twin: Twin | None = None,
        prepare: Callable[[nn.Module, nn.Module], None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        self.model = unwrap_module(model)
        self.loss_fn = loss_fn
        self.seed = v.check_seed(seed)
        self.include = v.compile_patterns("include", include)
        self.exclude = v.compile_patterns("exclude", exclude)
        self.max_check_memory = v.check_positive_int(
            "max_check_memory", max_check_memory, allow_none=True
        )
        named = named_trainable(self.model, [], [])
        self.model_dtype = named[0][1].dtype
        self._twin = twin
        self.prepare = prepare

    def twin(self) -> Twin:
        """The (cached) float64 copy."""
        if self._twin is None:
            self._twin = Twin(self.model, torch.float64, self.prepare)
        return self._twin

    def _selected(self, name: str) -> bool:
        return v.selected(name, self.include, self.exclude)

    def localize(self, batch: Any) -> LocalizationReport:
        """Check every module call on ``batch``; the model is left exactly as it was."""
        started = time.perf_counter()
        twin = self.twin()
        notes = list(twin.notes)
        notes += self._memory_notes()
        with host_rng_preserved(), twin.synced() as module:
            params = [p for _, p in named_trainable(module, [], [])]
            cast = cast_batch(batch, torch.float64, params[0].device)
            evaluator = Evaluator(
                module,
                [],
                params,
                cast,
                self.loss_fn,
                self.seed,
                torch.float64,
                draw_dtype=self.model_dtype,
            )
            selected = [(n or ROOT, m) for n, m in module.named_modules()]
            selected = [(n, m) for n, m in selected if self._selected(n)]
            try:
                calls = self._record(evaluator, selected, params)
                results, skipped, evaluations = self._check_calls(evaluator, selected, calls)
            finally:
                evaluator.restore_buffers()
        guilty = culprits(results, _containment(selected))
        return LocalizationReport(
            culprit=guilty[0] if guilty else None,
            culprits=guilty,
            modules=tuple(results),
            skipped=tuple(skipped),
            evaluations=evaluations,
            seconds=time.perf_counter() - started,
            notes=tuple(notes),
        )

    def _memory_notes(self) -> list[str]:
        if self.max_check_memory is None:
            return []
        need = sum(p.numel() * 8 for p in self.model.parameters())
        if need <= self.max_check_memory:
            return []
        return [
            f"the float64 copy's parameters alone take {need} bytes, over max_check_memory="
            f"{self.max_check_memory}; module-by-module checking is not implemented yet, so the "
            f"whole copy was used"
        ]

    def _record(
        self,
        evaluator: Evaluator,
        selected: list[tuple[str, nn.Module]],
        params: list[nn.Parameter],
    ) -> list[ModuleCall]:
        """One seeded forward/backward with every selected module's calls recorded."""
        recorder = _Recorder(selected, evaluator.devices)
        try:
            with evaluator._seed(), torch.enable_grad():
                loss = evaluator._loss_tensor(self.loss_fn(evaluator.module, evaluator.batch))
                loss = loss.reshape(())
                if loss.requires_grad:
                    torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            recorder.close()
            evaluator.restore_buffers()
        return recorder.calls

    def _check_calls(
        self,
        evaluator: Evaluator,
        selected: list[tuple[str, nn.Module]],
        calls: list[ModuleCall],
    ) -> tuple[list[ModuleResult], list[tuple[str, str]], int]:
        by_name: dict[str, list[ModuleCall]] = {}
        for call in calls:
            by_name.setdefault(call.name, []).append(call)
        results: list[ModuleResult] = []
        skipped: list[tuple[str, str]] = []
        evaluations = 0
        for index, (name, module) in enumerate(selected):
            mine = by_name.get(name, [])
            if not mine:
                if any(True for _ in module.parameters(recurse=False)):
                    skipped.append(
                        (
                            name,
                            "never called as a module (its parameters are checked inside "
                            "the check of the module that uses them)",
                        )
                    )
                continue
            reports: list[CheckReport] = []
            reasons: list[str] = []
            for k, call in enumerate(mine):
                report, reason, used = self._check_call(evaluator, call, (self.seed, index, k))
                evaluations += used
                if report is not None:
                    reports.append(report)
                elif reason:
                    reasons.append(reason)
            if not reports:
                if reasons:
                    skipped.append((name, reasons[0]))
                continue
            results.append(_module_result(name, module, reports))
        return results, skipped, evaluations

    def _check_call(
        self, evaluator: Evaluator, call: ModuleCall, seed: tuple[int, int, int]
    ) -> tuple[CheckReport | None, str, int]:
        """One call checked alone: its report, or why it was not checked (``""``: nothing to check)."""
        if not call.cotangents:
            if call.outputs == 0:
                return None, "", 0  # its output needs no gradient: its backward never runs
            return None, "its output does not reach the loss", 0
        prefix = "" if call.name == ROOT else call.name
        problem = LocalProblem(call, evaluator.computing, lambda n: True, prefix)
        if not problem.names:
            return None, "", 0
        try:
            problem.compute_base()
            report = run_check(
                problem,
                mode="directional",
                rng=np.random.default_rng(list(seed)),
                step=None,
            )
        except Exception as exc:  # a forward that cannot run alone is skipped, not fatal
            return (
                None,
                f"it could not be re-run alone ({type(exc).__name__}: {exc})",
                problem.evaluations,
            )
        return report, "", problem.evaluations


def _containment(selected: list[tuple[str, nn.Module]]) -> dict[str, set[str]]:
    """Module name → the names of the selected modules inside it (shared modules included)."""
    names = {id(m): n for n, m in selected}
    return {
        n: {names[id(sub)] for sub in m.modules() if id(sub) in names and sub is not m}
        for n, m in selected
    }


def _module_result(name: str, module: nn.Module, reports: list[CheckReport]) -> ModuleResult:
    verdicts: list[Verdict] = [r.verdict for r in reports]
    errors = [r.max_rel_error for r in reports if r.max_rel_error is not None]
    failed = [e for r in reports for e in r.failed]
    return ModuleResult(
        name=name,
        type=type(module).__name__,
        verdict=module_verdict(verdicts),
        max_rel_error=max(errors) if errors else None,
        calls=len(reports),
        detail=_detail(failed, len(reports)),
    )


def _detail(failed: Sequence[Any], calls: int) -> str:
    """``its input gradient is off by 10%`` from the failing entries (worst per slot)."""
    worst: dict[str, Any] = {}
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


def localize(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    *,
    seed: int = 0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    max_check_memory: int | None = None,
) -> LocalizationReport:
    """Find the module whose own backward is wrong.

    In one forward/backward of a float64 copy of ``model`` on ``batch``, every module call's
    inputs and output cotangent are recorded; each call is then checked alone: the scalar
    ``<cotangent, module(inputs; its parameters)>`` differentiated by autodiff along random
    directions against central finite differences. Parameter-free modules and custom autograd
    functions are covered, a module called several times is checked per call, and inputs that
    are not floating tensors are held fixed. The model is never changed.

    Args:
        model: Any ``torch.nn.Module``.
        batch: As for :func:`~gradwatch.torch.check_gradients`.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        seed: Seed of the random directions and of the recording pass's RNG.
        include: Regular expression(s) on module names (``"decoder"``): check only these.
        exclude: Regular expression(s) on module names: skip these.
        max_check_memory: Bytes the check may use (``None``: from free memory). Accepted and
            validated; checking module by module is not implemented yet (the report notes it).

    Returns:
        A :class:`~gradwatch.LocalizationReport`: ``culprit`` (``None`` when every module agrees),
        per-module results in model order; ``str(report)`` is a tree with the culprit marked.

    Example:
        >>> import torch
        >>> class Halved(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         return torch.tanh(x)
        ...     @staticmethod
        ...     def backward(ctx, g):
        ...         (x,) = ctx.saved_tensors if ctx.saved_tensors else (None,)
        ...         return 0.5 * g  # wrong: tanh' is not 1/2
        >>> class Act(torch.nn.Module):
        ...     def forward(self, x):
        ...         return Halved.apply(x)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), Act(), torch.nn.Linear(4, 1))
        >>> report = localize(model, torch.randn(8, 3), lambda m, x: m(x).pow(2).mean())
        >>> report.culprit
        '1'
    """
    return Localizer(
        model,
        loss_fn,
        seed=seed,
        include=include,
        exclude=exclude,
        max_check_memory=max_check_memory,
    ).localize(batch)
