"""``check_gradients`` / ``assert_gradients`` for any ``torch.nn.Module``, and the reusable checker.

The check runs on a float64 twin of the model (:mod:`gradwatch.torch.twin`), evaluates losses
deterministically (:mod:`gradwatch.torch.evaluate`, batched by :mod:`gradwatch.torch.vmap` where
that pays) and judges them with the framework-free engine (:func:`gradwatch.core.check.check_problem`).
``mode="modules"`` and models over ``max_check_memory`` are checked module by module
(:mod:`gradwatch.torch.module_checks`).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwatch import options as v
from gradwatch.core.assertion import raise_unless_verified
from gradwatch.core.check import check_problem
from gradwatch.core.fidelity import Agreement
from gradwatch.core.finite_diff import tolerances_for
from gradwatch.core.unchecked import unchecked_report
from gradwatch.localization import ROOT
from gradwatch.report import CheckReport
from gradwatch.torch.evaluate import (
    NP_DTYPES,
    Evaluator,
    LossFn,
    _finite,
    host_rng_preserved,
    np_dtype,
)
from gradwatch.torch.localize import Localizer
from gradwatch.torch.module_checks import check_modules, too_large
from gradwatch.torch.reference import OwnPass, compare, module_state_kept, own_pass
from gradwatch.torch.substitute import Substituted
from gradwatch.torch.twin import Twin, cast_batch, named_trainable, unwrap_module
from gradwatch.torch.vmap import BatchedEvaluator, Batching

__all__ = ["TorchChecker", "assert_gradients", "check_gradients"]


class TorchChecker:
    """A reusable gradient check of one module (the callbacks keep one and call :meth:`check`).

    The float64 twin is built once and refreshed with the model's current values at each check.

    Args:
        model: Any ``torch.nn.Module`` (``torch.compile`` and DDP wrappers are unwrapped).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
        num_params: Coordinates per check (``coordinate`` mode).
        mode: ``"coordinate"``, ``"directional"`` or ``"modules"`` (each module's own backward
            checked alone, :class:`~gradwatch.torch.localize.Localizer`).
        dtype: ``"float64"`` (a float64 twin), ``"float32"`` or ``None`` (the model's dtype).
        eps: Base step replacing ``cbrt(eps_machine)``.
        rtol: Tolerance; ``None`` for the dtype's default.
        seed: Seed of the private sampling generator and of the evaluations' RNG.
        include: Regular expression(s) a parameter name must match.
        exclude: Regular expression(s) a parameter name must not match.
        vectorize: ``None`` (default): evaluate each tensor's perturbations in batches with
            ``torch.func.vmap`` where that gives the loop's losses and is faster (measured on the
            first checks, per tensor); ``False``: always one at a time; ``True``: vmap wherever
            it works, without timing it.
        prepare: Called as ``prepare(model, twin)`` once the twin is built (e.g. to restore a
            trainer reference or silence logging on it).
        model_context: Entered around every call of ``loss_fn`` on the model itself (its own
            pass, and the checks that evaluate it when the copy is not its function): Lightning
            silences ``self.log`` there.
        max_check_memory: Bytes the float64 copy may take (``None``: the device's free memory);
            over it, each module is checked on a float64 copy of itself (``mode="modules"``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        num_params: int = 32,
        mode: str = "coordinate",
        dtype: str | None = "float64",
        eps: float | None = None,
        rtol: float | None = None,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        vectorize: bool | None = None,
        prepare: Callable[[nn.Module, nn.Module], None] | None = None,
        model_context: Callable[[], AbstractContextManager[Any]] | None = None,
        max_check_memory: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        o = v.CheckOptions.validate(
            num_params=num_params,
            mode=mode,
            dtype=dtype,
            eps=eps,
            rtol=rtol,
            seed=seed,
            include=include,
            exclude=exclude,
        )
        self.num_params, self.mode, self.dtype_name = o.num_params, o.mode, o.dtype
        self.eps, self.rtol, self.seed = o.eps, o.rtol, o.seed
        self.include, self.exclude = o.include, o.exclude
        #: ``include``/``exclude`` of ``mode="modules"``: they select modules by name there,
        #: and every parameter takes part in verifying the float64 copy.
        self.module_patterns: tuple[list[re.Pattern[str]], list[re.Pattern[str]]] = ([], [])
        if self.mode == "modules":
            self.module_patterns = (self.include, self.exclude)
            self.include, self.exclude = [], []
        self.vectorize = v.check_optional_bool("vectorize", vectorize)
        self.max_check_memory = v.check_positive_int(
            "max_check_memory", max_check_memory, allow_none=True
        )
        self._localizer: Localizer | None = None
        #: Per-tensor choice of vmap or the loop, kept across checks.
        self.batching: dict[str, Batching] = {}
        self.model = unwrap_module(model)
        if self.mode == "modules":
            modules = [n or ROOT for n, _ in self.model.named_modules()]
            v.check_selection(modules, *self.module_patterns, what="module")
        self.loss_fn = loss_fn
        self.prepare = prepare
        named = named_trainable(self.model, self.include, self.exclude)
        self.names = [n for n, _ in named]
        self.model_dtype = named[0][1].dtype
        self.torch_dtype = self._target_dtype(self.model_dtype)
        #: The float64 guard (:mod:`gradwatch.torch.precision`) on float64 checks; ``False``
        #: only to measure what it costs.
        self.float64_guard = True
        self._twin: Twin | None = None
        self.model_context = model_context
        #: Why the copy is not the model's function (found at a check; then the model itself
        #: is evaluated with float64 tensors swapped in), or ``""``.
        self.copy_disagrees = ""
        #: The last comparison of a float64 evaluation with the model's own pass.
        self.agreement: Agreement | None = None
        self._own: OwnPass | None = None

    def _target_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        if self.dtype_name == "float64":
            return torch.float64
        if self.dtype_name == "float32":
            return torch.float32
        return model_dtype if model_dtype in NP_DTYPES else torch.float32

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Checked tensor name → shape, in model order."""
        lookup = dict(named_trainable(self.model, self.include, self.exclude))
        return {n: tuple(lookup[n].shape) for n in self.names}

    def twin(self) -> Twin:
        """The (cached) module the checks compute on."""
        if self._twin is None:
            self._twin = Twin(self.model, self.torch_dtype, self.prepare)
        return self._twin

    def check(
        self,
        batch: Any,
        *,
        step: int | None = None,
        tensors: Sequence[int] | None = None,
        sample_seed: Sequence[int] | int | None = None,
    ) -> CheckReport:
        """Run one check on ``batch``; the model is left exactly as it was.

        Before judging, the float64 evaluation is compared with the model's own loss and gradient
        on the same batch and seed (:mod:`gradwatch.torch.reference`); a copy that is not the
        model's function is replaced by the model itself with float64 tensors swapped in, and if
        that disagrees too the report is ``inconclusive`` with an ``unchecked`` event.

        Args:
            batch: Passed to ``loss_fn`` after its floating tensors are cast to the check dtype.
            step: Optimizer step recorded in the report.
            tensors: Indices into :attr:`names` to check (default all).
            sample_seed: Seed of this check's private generator (default ``seed``).
        """
        started = time.perf_counter()
        rng = np.random.default_rng(self.seed if sample_seed is None else sample_seed)
        seed = int(rng.integers(2**62))
        limit = too_large(self)
        if self.mode == "modules" or limit is not None:
            return check_modules(self, batch, seed, step, started, limit)
        twin = self.twin()
        chosen = list(range(len(self.names))) if tensors is None else list(tensors)
        judge = self.judge(chosen, self.mode, rng, step, started)

        self._own = None
        with host_rng_preserved():
            if twin.in_place or not self.copy_disagrees:
                # In place, the model itself computes: nothing to verify.
                report = self._on_copy(twin, batch, seed, judge, verify=not twin.in_place)
                if report is not None:
                    return report
            return self._on_model(batch, seed, judge, step, started)

    def _evaluator(self, module: nn.Module, batch: Any, seed: int, **kwargs: Any) -> Evaluator:
        lookup = dict(named_trainable(module, self.include, self.exclude))
        params = [lookup[n] for n in self.names]
        return self._evaluator_of(module, params, batch, seed, self.loss_fn, **kwargs)

    def _evaluator_of(
        self,
        module: nn.Module,
        params: list[Any],
        batch: Any,
        seed: int,
        loss_fn: LossFn,
        *,
        vectorize: bool | None = None,
        **kwargs: Any,
    ) -> Evaluator:
        cast = cast_batch(batch, self.torch_dtype, params[0].device)
        args = (module, self.names, params, cast, loss_fn, seed, self.torch_dtype)
        draw, guard = self.model_dtype, self.float64_guard
        if vectorize is False:
            return Evaluator(*args, draw_dtype=draw, float64_guard=guard, **kwargs)
        return BatchedEvaluator(
            *args,
            batching=self.batching,
            force_vmap=vectorize is True,
            draw_dtype=draw,
            float64_guard=guard,
            **kwargs,
        )

    def _on_copy(
        self,
        twin: Twin,
        batch: Any,
        seed: int,
        judge: Callable[[Evaluator, list[str]], CheckReport],
        *,
        verify: bool,
    ) -> CheckReport | None:
        """The check on the twin; ``None`` when ``verify`` finds it is not the model's function."""
        with twin.synced() as module:
            evaluator = self._evaluator(module, batch, seed, vectorize=self.vectorize)
            try:
                evaluator.compute_base()
                if verify and not self.copy_agrees(evaluator, batch, seed):
                    return None
                return judge(evaluator, [*twin.notes, *self._precision_note()])
            finally:
                evaluator.restore_buffers()

    def judge(
        self,
        tensors: list[int],
        mode: str,
        rng: np.random.Generator,
        step: int | None,
        started: float,
        *,
        num_params: int | None = None,
        lead: Sequence[str] = (),
    ) -> Callable[[Evaluator, list[str]], CheckReport]:
        """How an evaluator is judged: the engine on ``tensors`` in ``mode`` with this checker's
        tolerances (``lead``: notes put before the evaluator's)."""

        def judge(evaluator: Evaluator, notes: list[str]) -> CheckReport:
            return check_problem(
                evaluator,
                tensors=tensors,
                num_params=self.num_params if num_params is None else num_params,
                mode=mode,
                rng=rng,
                rtol=self.rtol,
                eps=self.eps,
                step=step,
                notes=[*lead, *notes],
                started=started,
                hint="check that loss_fn runs the model",
            )

        return judge

    def copy_agrees(self, evaluator: Evaluator, batch: Any, seed: int) -> bool:
        """Whether the copy (``evaluator``, base computed) gives the model's own loss and gradients
        (else :attr:`copy_disagrees` says how); a non-finite one is left to the engine."""
        if not _finite(evaluator):
            return True
        self._own = self._own_pass(batch, seed)
        found = compare(self.names, evaluator.base_loss, evaluator.autodiff, self._own)
        self.agreement = found
        if not found.agrees:
            self.copy_disagrees = "the float64 copy's " + found.describe()
        return found.agrees

    def _own_pass(self, batch: Any, seed: int) -> OwnPass:
        lookup = dict(named_trainable(self.model, self.include, self.exclude))
        params = [lookup[n] for n in self.names]
        return own_pass(
            self.model, params, batch, self.loss_fn, seed=seed, context=self.model_context
        )

    def _precision_note(self) -> list[str]:
        """Say so when the copy could be verified only at 16-bit precision."""
        a = self.agreement
        if a is None or a.tolerance.precision in ("float32", "float64"):
            return []
        return [
            f"the float64 evaluation was verified against the model's own {a.tolerance.precision} "
            f"pass, which resolves its gradient only to {a.tolerance.gradient:g} (relative): a "
            f"copy that lost a module can pass that; compute the loss without autocast in "
            f"loss_fn to verify it at float32 precision"
        ]

    def _on_model(
        self,
        batch: Any,
        seed: int,
        judge: Callable[[Evaluator, list[str]], CheckReport],
        step: int | None,
        started: float,
    ) -> CheckReport:
        """The check on the model itself, float64 tensors swapped in (the copy was not faithful)."""
        own = self._own if self._own is not None else self._own_pass(batch, seed)
        sub = Substituted(self.model, self.loss_fn, self.torch_dtype, self.twin().device)
        with (
            module_state_kept(self.model),
            self.model_context() if self.model_context else contextlib.nullcontext(),
        ):
            evaluator = self._evaluator_of(
                self.model,
                sub.tensors(self.names),
                batch,
                seed,
                sub.loss_fn,
                vectorize=False,
                buffers=sub.buffers,
            )
            evaluator.compute_base()
            found = compare(self.names, evaluator.base_loss, evaluator.autodiff, own)
            self.agreement = found
            if found.agrees:
                note = (
                    f"{self.copy_disagrees} (copy.deepcopy does not reproduce every module), so "
                    f"this check evaluated the model itself with float64 tensors swapped in "
                    f"(torch.func.functional_call), one perturbation at a time"
                )
                return judge(evaluator, [*self.twin().notes, note, *self._precision_note()])
        hooked = [n for n, p in named_trainable(self.model, [], []) if p._backward_hooks]
        if hooked:
            shown = ", ".join(hooked[:3]) + (
                f" and {len(hooked) - 3} more" if len(hooked) > 3 else ""
            )
            message = (
                f"gradient hooks registered on {shown} (Tensor.register_hook) change what "
                f"autodiff gives: without them, the float64 {found.describe()}, so nothing was "
                f"verified; gradwatch checks the loss's own derivative, which a hook that "
                f"rescales or clips a gradient changes — remove the hook if it is not meant to "
                f"change gradients, or clip in the optimizer step"
            )
        else:
            message = (
                f"{self.copy_disagrees}, and the model itself, evaluated with float64 tensors "
                f"swapped in (torch.func.functional_call), disagrees too (its "
                f"{found.describe()}): the loss function computes another function in float64 "
                f"than in the model's dtype, so nothing was verified; make loss_fn compute the "
                f"same function in float64, or check in the model's dtype (dtype=None)"
            )
        self.copy_disagrees = ""  # not the copy's fault: the next check tries it again
        return unchecked_report(
            step=step,
            message=message,
            mode=self.mode,
            dtype=str(self.torch_dtype).replace("torch.", ""),
            rtol=tolerances_for(np_dtype(self.torch_dtype), self.rtol).rtol,
            evaluations=evaluator.evaluations + 2,
            seconds=time.perf_counter() - started,
            notes=self.twin().notes,
        )


def check_gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    *,
    num_params: int = 32,
    mode: str = "coordinate",
    dtype: str | None = "float64",
    eps: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    vectorize: bool | None = None,
    max_check_memory: int | None = None,
) -> CheckReport:
    """Compare autodiff gradients of ``loss_fn(model, batch)`` with central finite differences.

    Every trainable tensor is checked: ``num_params`` coordinates in all, bigger tensors getting
    more and every tensor at least one (``mode="coordinate"``), or one random unit direction per
    tensor (``mode="directional"``). ``mode="modules"`` checks each module's own backward alone
    instead (as :func:`~gradwatch.torch.localize` does): a failure names the module, and the
    check costs about as much as a coordinate check or less. The model is never changed.

    Args:
        model: Any ``torch.nn.Module``.
        batch: A tensor, tuple, list, dict or nested mix; floating tensors are cast to the check
            dtype, integer tensors (token ids, labels) are not.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        num_params: Coordinates in all (at least one per tensor).
        mode: ``"coordinate"``, ``"directional"`` or ``"modules"`` (then ``include`` /
            ``exclude`` match module names, and entries are named ``module:input`` for an
            input's direction, by full name for a parameter's).
        dtype: ``"float64"`` (default, a float64 copy), ``"float32"`` or ``None`` (the model's
            dtype, in place): float32 cannot see bugs smaller than about 40% of a gradient.
        eps: Replaces ``cbrt(eps_machine)`` in the step ``h = eps * max(1, |θ|)``.
        rtol: Tolerance (default 1e-3 in float64, 0.4 aggregate in float32).
        seed: Seed of the private sampling generator.
        include: Regular expression(s) on parameter names to check.
        exclude: Regular expression(s) on parameter names to skip.
        vectorize: ``None``: evaluate perturbations in batches with ``torch.func.vmap`` where
            that reproduces the loop's loss and is faster; ``False``: one at a time; ``True``:
            vmap wherever it works.
        max_check_memory: Bytes the float64 copy may take (``None``: the free memory the
            model's device reports). A model whose copy would exceed it is checked module by
            module, each on a float64 copy of itself alone (as ``mode="modules"``; the report's
            notes say so and name modules too large to check alone).

    Returns:
        A :class:`~gradwatch.CheckReport`; ``str(report)`` is a readable table.

    Raises:
        ValueError: Bad arguments, no trainable parameters, a non-scalar loss, or a loss that
            depends on none of the checked parameters.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> batch = torch.randn(16, 4)
        >>> report = check_gradients(model, batch, lambda m, x: m(x).pow(2).mean())
        >>> report.verdict, len(report.params)
        ('pass', 4)
    """
    checker = TorchChecker(
        model,
        loss_fn,
        num_params=num_params,
        mode=mode,
        dtype=dtype,
        eps=eps,
        rtol=rtol,
        seed=seed,
        include=include,
        exclude=exclude,
        vectorize=vectorize,
        max_check_memory=max_check_memory,
    )
    return checker.check(batch)


def assert_gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    *,
    allow_inconclusive: bool = False,
    **kwargs: Any,
) -> CheckReport:
    """Like :func:`check_gradients`, but raise :class:`~gradwatch.GradientCheckError` unless it passed.

    Meant for a user's own unit tests of custom layers: a check that verified nothing fails the
    test too. gradwatch's own frames are hidden from pytest tracebacks.

    Args:
        model: As for :func:`check_gradients`.
        batch: As for :func:`check_gradients`.
        loss_fn: As for :func:`check_gradients`.
        allow_inconclusive: Return an ``inconclusive`` report instead of raising.
        **kwargs: Any keyword argument of :func:`check_gradients`.

    Raises:
        GradientCheckError: On ``fail``, and on ``inconclusive`` (which entries could not be
            judged and why) unless ``allow_inconclusive=True``; ``.report`` holds the report.

    Example:
        >>> import torch
        >>> assert_gradients(torch.nn.Linear(2, 1), torch.randn(3, 2),
        ...                  lambda m, x: m(x).sum()).verdict
        'pass'
    """
    __tracebackhide__ = True
    report = check_gradients(model, batch, loss_fn, **kwargs)
    return raise_unless_verified(report, allow_inconclusive=allow_inconclusive)
