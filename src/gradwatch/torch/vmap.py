"""Batched evaluation: a tensor's perturbations through ``torch.func.vmap`` where it pays.

Per tensor, decided on the first checks and kept across checks: one perturbation by the loop, the
rest through ``vmap(functional_call, randomness="same")`` together with the unperturbed tensor,
whose loss must equal the base loss (else that tensor goes back to the loop); the faster path
is kept. BatchNorm in train mode is retried with batched buffers; ``nn.LSTM`` (no batching rule),
any error or a memory budget exceeded send the tensor to the loop.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from gradwatch.core.check import Perturbation
from gradwatch.torch.evaluate import Evaluator, LossFn

__all__ = ["BatchedEvaluator", "Batching"]

_log = logging.getLogger("gradwatch")

#: Memory one batched evaluation may take beyond a plain one: its batch of perturbed copies and
#: their activations (bytes; on CUDA also at most a quarter of the free memory).
VMAP_MEMORY_BYTES = 256 * 2**20
#: Most perturbations evaluated in one ``vmap`` call.
VMAP_MAX_CHUNK = 32
#: Fewest perturbations of one tensor worth a vmap call (two: one direction's ±h, never pays).
VMAP_MIN_GROUP = 4
#: vmap must take at most this share of the loop's time per evaluation to be kept for a tensor.
VMAP_GAIN = 0.8


@dataclass
class Batching:
    """How the perturbations of one tensor are evaluated: measured, then ``vmap`` or the loop.

    The first checks evaluate a tensor's perturbations both ways (one by the loop, all through
    ``vmap``), compare the shared loss (vmap must reproduce the loop's value: same dropout masks,
    same BatchNorm statistics) and the time per evaluation; the faster path is kept.
    """

    mode: str = "measure"  # "measure" | "vmap" | "loop"
    forced: bool = False  # vectorize=True: keep vmap wherever it works, whatever it costs
    batched_buffers: bool = False
    loop_seconds: list[float] = field(default_factory=list)
    vmap_seconds: list[float] = field(default_factory=list)
    reason: str = ""

    def settle(self, name: str) -> None:
        """Keep the faster path once the measurements decide it (two rounds, or one clear one)."""
        loop, vm = min(self.loop_seconds), min(self.vmap_seconds)
        ratio = vm / loop if loop > 0 else 1.0
        if len(self.vmap_seconds) < 2 and 0.5 <= ratio <= 1.5 and not self.forced:
            return
        self.mode = "vmap" if ratio <= VMAP_GAIN or self.forced else "loop"
        self.reason = f"vmap takes {ratio:.2f}x the loop's time per evaluation"
        _log.debug("gradwatch: %s evaluated by %s (%s)", name, self.mode, self.reason)

    def give_up(self, name: str, reason: str) -> None:
        self.mode, self.reason = "loop", reason
        _log.debug("gradwatch: %s evaluated by the loop (%s)", name, reason)


class _LossModule(nn.Module):
    """``loss_fn(module, batch)`` as a module, so ``functional_call`` can swap tensors in."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self._loss_fn(self.inner, batch)


class BatchedEvaluator(Evaluator):
    """An :class:`~gradwatch.torch.evaluate.Evaluator` that batches a tensor's perturbations.

    Args:
        batching: Per-tensor plans, shared with the checker across checks.
        force_vmap: ``vectorize=True``: keep vmap wherever it works, without timing it.
    """

    def __init__(
        self,
        *args: Any,
        batching: dict[str, Batching],
        force_vmap: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.batching = batching
        self.force_vmap = force_vmap
        self._wrapper: _LossModule | None = None

    def _group_losses(self, tensor: int, perts: list[Perturbation]) -> npt.NDArray[np.float64]:
        name = self._names[tensor]
        plan = self.batching.get(name)
        if plan is None:
            plan = self.batching[name] = Batching(forced=self.force_vmap)
        if plan.mode == "loop" or len(perts) < VMAP_MIN_GROUP:
            return self._loop(perts)
        chunk = self._chunk(tensor)
        if chunk < 2:
            plan.give_up(name, "a batch of perturbed copies would not fit the memory budget")
            return self._loop(perts)
        if plan.mode == "vmap":
            try:
                return self._vmapped(tensor, perts, plan, chunk)
            except Exception as exc:  # a layer without a batching rule, out of memory, ...
                plan.give_up(name, f"vmap failed: {type(exc).__name__}: {exc}")
                return self._loop(perts)
        # Measuring: the first perturbation by the loop, the others through vmap together with
        # the unperturbed tensor, whose loss must come out as the base loss did.
        started = time.perf_counter()
        first = self._loop(perts[:1])
        plan.loop_seconds.append(time.perf_counter() - started)
        centre = Perturbation(tensor, None, self.params[tensor].detach().cpu().numpy())
        modules = len(sys.modules)
        started = time.perf_counter()
        try:
            values = self._vmapped(tensor, [centre, *perts[1:]], plan, chunk)
        except Exception as exc:
            plan.give_up(name, f"vmap failed: {type(exc).__name__}: {exc}")
            return np.concatenate([first, self._loop(perts[1:])])
        seconds = time.perf_counter() - started
        if len(sys.modules) == modules:  # not a first call that imported torch's decompositions
            plan.vmap_seconds.append(seconds / len(perts))
        tolerance = 1e4 * float(np.finfo(self.np_dtype).eps) * max(1.0, abs(self._base))
        if not (abs(float(values[0]) - self._base) <= tolerance):
            plan.give_up(
                name,
                f"vmap gave a different loss ({float(values[0])!r} vs the loop's {self._base!r})",
            )
            return np.concatenate([first, self._loop(perts[1:])])
        if plan.mode == "measure" and plan.vmap_seconds:
            plan.settle(name)
        return np.concatenate([first, values[1:]])

    def _chunk(self, tensor: int) -> int:
        """Perturbations per vmap call that keep it within the memory budget."""
        p = self.params[tensor]
        budget = VMAP_MEMORY_BYTES
        if p.device.type == "cuda":
            budget = min(budget * 4, torch.cuda.mem_get_info(p.device)[0] // 4)
        per_copy = self._activation_bytes + p.numel() * p.element_size()
        return int(min(VMAP_MAX_CHUNK, budget // max(per_copy, 1)))

    def _fqn(self, tensor: int) -> str:
        target = self.params[tensor]
        for qualified, p in self.module.named_parameters():
            if p is target:
                return "inner." + qualified
        raise KeyError(self._names[tensor])

    def _vmapped(
        self, tensor: int, perts: Sequence[Perturbation], plan: Batching, chunk: int
    ) -> npt.NDArray[np.float64]:
        """Losses of one tensor's perturbations, ``chunk`` at a time in one ``vmap`` call each."""
        from torch.func import functional_call, vmap

        if self._wrapper is None:
            self._wrapper = _LossModule(self.module, self.loss_fn)
        wrapper, qualified = self._wrapper, self._fqn(tensor)
        p = self.params[tensor].detach()
        buffers = {"inner." + n: b for n, b in self.module.named_buffers()}

        def loss(value: torch.Tensor, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
            swapped = {qualified: value, **bufs}
            return self._loss_tensor(functional_call(wrapper, swapped, (self.batch,))).reshape(())

        out: list[npt.NDArray[np.float64]] = []
        for begin in range(0, len(perts), chunk):
            part = perts[begin : begin + chunk]
            values = p.unsqueeze(0).repeat(len(part), *([1] * p.dim()))
            for k, pert in enumerate(part):
                v = torch.as_tensor(np.asarray(pert.value), dtype=p.dtype, device=p.device)
                if pert.index is None:
                    values[k] = v
                else:
                    values[(k, *pert.index)] = v
            out.append(self._vmap_call(loss, values, buffers, plan, vmap, self._names[tensor]))
        return np.concatenate(out)

    def _vmap_call(
        self,
        loss: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
        values: torch.Tensor,
        buffers: dict[str, torch.Tensor],
        plan: Batching,
        vmap: Any,
        name: str,
    ) -> npt.NDArray[np.float64]:
        n = values.shape[0]
        attempts = [True] if plan.batched_buffers or not buffers else [False, True]
        for k, batched in enumerate(attempts):
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if batched:
                        bufs = {
                            key: b.unsqueeze(0).repeat(n, *([1] * b.dim()))
                            for key, b in buffers.items()
                        }
                        fn = vmap(loss, in_dims=(0, 0), randomness="same")
                    else:
                        bufs, fn = {}, vmap(loss, in_dims=(0, None), randomness="same")
                    result = self._seeded(functools.partial(fn, values, bufs))
            except Exception:
                if k + 1 == len(attempts):
                    raise
                continue  # e.g. BatchNorm: "running_mean ... not batched": batch the buffers too
            self.evaluations += n
            plan.batched_buffers = batched
            slow = [str(w.message) for w in caught if "batching rule" in str(w.message)]
            if slow:
                plan.give_up(name, f"vmap has no batching rule here: {slow[0][:120]}")
            out: npt.NDArray[np.float64] = result.detach().double().cpu().numpy().reshape(n)
            return out
        raise AssertionError("unreachable")
