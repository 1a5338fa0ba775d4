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

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from gradwatch import options as v
from gradwatch.core.local import check_local
from gradwatch.core.memory import available_ram
from gradwatch.localization import ROOT, LocalizationReport, ModuleResult, module_result
from gradwatch.report import CheckReport
from gradwatch.torch.evaluate import Evaluator, LossFn, host_rng_preserved
from gradwatch.torch.local_check import LocalProblem, ModuleCall, tensor_leaves, with_leaves
from gradwatch.torch.twin import Twin, cast_batch, named_trainable, unwrap_module

__all__ = ["Localizer", "float64_bytes", "free_memory", "localize"]


def float64_bytes(module: nn.Module) -> int:
    """Bytes a float64 copy of ``module``'s parameters and floating buffers takes.

    Example:
        >>> float64_bytes(torch.nn.Linear(3, 2))   # 6 weights + 2 biases
        64
    """
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * 8 for t in tensors if t.is_floating_point())


def free_memory(device: torch.device) -> int | None:
    """The free memory the device reports, in bytes (``None`` when it cannot be read).

    CUDA: ``torch.cuda.mem_get_info``; otherwise the host's available RAM
    (:func:`gradwatch.core.memory.available_ram`).
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_ram()


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
        max_check_memory: Bytes the float64 copy may take (``None``: the free memory the
            model's device reports, unless a ``twin`` is given). A model whose float64 copy
            would exceed it is checked module by module (see :meth:`localize`).
        twin: The float64 copy to compute on (the callback shares its checker's).
        prepare: Called as ``prepare(model, twin)`` once a twin is built here.
        rtol: Tolerance of each module's check (``None``: the float64 default).
        eps: Base finite-difference step (``None``: the default).
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
        rtol: float | None = None,
        eps: float | None = None,
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
        self.rtol = v.check_positive_float("rtol", rtol, allow_none=True)
        self.eps = v.check_positive_float("eps", eps, allow_none=True)
        self._seed = self.seed

    def twin(self) -> Twin:
        """The (cached) float64 copy."""
        if self._twin is None:
            self._twin = Twin(self.model, torch.float64, self.prepare)
        return self._twin

    def _modules(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The selected modules of ``module`` by name (the module itself: :data:`ROOT`)."""
        named = [(n or ROOT, m) for n, m in module.named_modules()]
        return [(n, m) for n, m in named if v.selected(n, self.include, self.exclude)]

    def memory_limit(self) -> int | None:
        """The bytes a float64 copy may take: ``max_check_memory``, else (no twin given yet) the
        free memory of the model's device; ``None``: no limit."""
        if self.max_check_memory is not None:
            return self.max_check_memory
        if self._twin is not None:
            return None  # the copy exists already
        return free_memory(next(self.model.parameters()).device)

    def localize(self, batch: Any, *, seed: int | None = None) -> LocalizationReport:
        """Check every module call on ``batch``; the model is left exactly as it was.

        When the float64 copy of the whole model would exceed :meth:`memory_limit`, the
        forward/backward that records the calls runs on the model itself in its own dtype, and
        each module is checked on a float64 copy of that module alone (inputs and cotangents cast
        to float64); modules whose own copy exceeds the limit are reported as skipped.

        ``seed`` replaces the constructor's seed for this call (each check of a callback draws
        its own directions).
        """
        started = time.perf_counter()
        self._seed = self.seed if seed is None else v.check_seed(seed)
        limit = self.memory_limit()
        if limit is not None and self._twin is None and float64_bytes(self.model) > limit:
            return self._localize_by_module(batch, limit, started)
        twin = self.twin()
        notes = list(twin.notes)
        with host_rng_preserved(), twin.synced() as module:
            params = [p for _, p in named_trainable(module, [], [])]
            cast = cast_batch(batch, torch.float64, params[0].device)
            evaluator = Evaluator(
                module,
                [],
                params,
                cast,
                self.loss_fn,
                self._seed,
                torch.float64,
                draw_dtype=self.model_dtype,
            )
            selected = self._modules(module)
            try:
                calls = self._record(evaluator, selected, params)
                results, skipped, evaluations = self._check_calls(evaluator, selected, calls)
            finally:
                evaluator.restore_buffers()
        return LocalizationReport.from_results(
            results,
            skipped,
            _containment(selected),
            evaluations=evaluations,
            started=started,
            notes=notes,
        )

    def _localize_by_module(self, batch: Any, limit: int, started: float) -> LocalizationReport:
        """Record on the model itself in its dtype; check each module on its own float64 copy."""
        model = self.model
        params = [p for _, p in named_trainable(model, [], [])]
        evaluator = Evaluator(
            model,
            [],
            params,
            batch,
            self.loss_fn,
            self._seed,
            self.model_dtype,
            float64_guard=False,
        )
        selected = self._modules(model)
        with host_rng_preserved():
            try:
                calls = self._record(evaluator, selected, params)
                results, skipped, evaluations = self._check_calls(evaluator, selected, calls, limit)
            finally:
                evaluator.restore_buffers()
        note = (
            f"the float64 copy of the model would take {float64_bytes(model)} bytes, over "
            f"max_check_memory={limit}, so it was checked module by module: calls recorded in "
            f"{str(self.model_dtype).removeprefix('torch.')}, each module checked on a float64 "
            f"copy of itself alone"
        )
        return LocalizationReport.from_results(
            results,
            skipped,
            _containment(selected),
            evaluations=evaluations,
            started=started,
            notes=(note,),
        )

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
        limit: int | None = None,
    ) -> tuple[list[ModuleResult], list[tuple[str, str]], int]:
        """Each selected module's calls checked alone (``limit``: each on a float64 copy of the
        module, if that copy fits)."""
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
                report, reason, used = self._check_call(
                    evaluator, call, (self._seed, index, k), limit
                )
                evaluations += used
                if report is not None:
                    reports.append(report)
                elif reason:
                    reasons.append(reason)
            if not reports:
                if reasons:
                    skipped.append((name, reasons[0]))
                continue
            results.append(module_result(name, type(module).__name__, reports))
        return results, skipped, evaluations

    def _check_call(
        self,
        evaluator: Evaluator,
        call: ModuleCall,
        seed: tuple[int, int, int],
        limit: int | None = None,
    ) -> tuple[CheckReport | None, str, int]:
        """One call checked alone: its report, or why it was not checked (``""``: nothing to check)."""
        if not call.cotangents:
            if call.outputs == 0:
                return None, "", 0  # its output needs no gradient: its backward never runs
            return None, "its output does not reach the loss", 0
        prefix = "" if call.name == ROOT else call.name
        computing: Callable[[], AbstractContextManager[Any]] = evaluator.computing
        if limit is not None:
            size = float64_bytes(call.module)
            if size > limit:
                return None, f"too large to check alone ({size} bytes in float64)", 0
            call, computing = _float64_call(call, self.loss_fn, self.model_dtype)
        problem = LocalProblem(call, computing, lambda n: True, prefix)
        return check_local(problem, seed, rtol=self.rtol, eps=self.eps)


def _float64_call(
    call: ModuleCall, loss_fn: LossFn, draw_dtype: torch.dtype
) -> tuple[ModuleCall, Callable[[], AbstractContextManager[Any]]]:
    """The call on a float64 copy of its module, inputs, buffers and cotangents cast to float64,
    and the float64 guard to evaluate it under."""

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64) if t.is_floating_point() else t

    module = copy.deepcopy(call.module).to(torch.float64)
    leaves = iter([wide(t) for t in tensor_leaves((call.args, call.kwargs))])
    args, kwargs = with_leaves((call.args, call.kwargs), leaves)
    wide_call = dataclasses.replace(
        call,
        module=module,
        args=tuple(args),
        kwargs=dict(kwargs),
        buffers=[wide(b) for b in call.buffers],
        cotangents={k: wide(c) for k, c in call.cotangents.items()},
    )
    guard = Evaluator(module, [], [], None, loss_fn, 0, torch.float64, draw_dtype=draw_dtype)
    return wide_call, guard.computing


def _containment(selected: list[tuple[str, nn.Module]]) -> dict[str, set[str]]:
    """Module name → the names of the selected modules inside it (shared modules included)."""
    names = {id(m): n for n, m in selected}
    return {
        n: {names[id(sub)] for sub in m.modules() if id(sub) in names and sub is not m}
        for n, m in selected
    }


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
        max_check_memory: Bytes the float64 copy may take (``None``: the free memory the
            model's device reports). A model whose float64 copy would exceed it is checked
            module by module: the calls are recorded in the model's own dtype and each module
            is checked on a float64 copy of itself alone; the report's ``skipped`` names the
            modules too large to check alone.

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
