"""One module call checked alone: the engine's ``Problem`` for ``<cotangent, module(inputs; params)>``.

A localization (:mod:`gradwatch.torch.localize`) records, in one forward/backward of the float64
copy, each module call's inputs, RNG state and buffers, and the cotangent its output received.
:class:`LocalProblem` then presents that call to the check engine as a scalar function of

- each floating input that needed a gradient in training (one slot per input tensor),
- each of the module's own parameters (one slot each), and
- the parameters of its submodules, as one flat slot (a parent's own code may use them directly,
  as ``MultiheadAttention`` uses ``out_proj.weight``);

so one random direction per slot compares the module's own backward with a central difference of
the module alone. Every evaluation starts from the recorded RNG state (dropout draws the mask it
drew in training) and recorded buffers, inputs are fresh clones (in-place modules are fine), and
the parameters are written back afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from gradwatch.core.problem import Perturbation
from gradwatch.localization import INNER_SLOTS, slot_phrase
from gradwatch.torch.evaluate import evaluation_grad_mode, retrying_with_grad
from gradwatch.torch.twin import padding_rows

__all__ = ["LocalProblem", "ModuleCall", "slot_phrase", "tensor_leaves", "with_leaves"]

#: The name of the slot holding the parameters of a module's submodules.
INNER = INNER_SLOTS[0]


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors in a nested tuple / list / dict, in order.

    Example:
        >>> [t.tolist() for t in tensor_leaves((torch.ones(1), {"m": [torch.zeros(1)]}, 3))]
        [[1.0], [0.0]]
    """
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in tensor_leaves(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in tensor_leaves(x)]
    return []


def with_leaves(obj: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """``obj`` with its tensors replaced, in :func:`tensor_leaves` order, by ``leaves``.

    Example:
        >>> with_leaves((torch.ones(1), 2), iter([torch.zeros(1)]))
        (tensor([0.]), 2)
    """
    if isinstance(obj, torch.Tensor):
        return next(leaves)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(with_leaves(x, leaves) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(with_leaves(x, leaves) for x in obj)
    if isinstance(obj, dict):
        return {k: with_leaves(x, leaves) for k, x in obj.items()}
    return obj


@dataclass
class ModuleCall:
    """One recorded call of a module during the recording pass.

    Attributes:
        name: The module's name.
        module: The module (of the float64 copy).
        args: Positional inputs, tensors detached and cloned.
        kwargs: Keyword inputs, likewise.
        needs_grad: Per input tensor (in :func:`tensor_leaves` order): floating and carrying a
            gradient in training.
        rng: The CPU generator state at the call.
        cuda_rng: ``(device index, state)`` of each CUDA generator in use.
        buffers: The module's buffers (submodules' included) at the call.
        outputs: How many output tensors had a cotangent hook.
        cotangents: The cotangent each output tensor received (``None``: it did not reach the loss).
    """

    name: str
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    needs_grad: list[bool]
    rng: torch.Tensor
    cuda_rng: list[tuple[int, torch.Tensor]]
    buffers: list[torch.Tensor]
    outputs: int = 0
    cotangents: dict[int, torch.Tensor] = field(default_factory=dict)

    def store(self, position: int) -> Callable[[torch.Tensor], None]:
        """A tensor hook keeping the cotangent of output ``position``."""

        def hook(grad: torch.Tensor) -> None:
            self.cotangents[position] = grad.detach().clone()

        return hook


class LocalProblem:
    """A module call as the check engine's ``Problem`` (see the module docstring).

    Args:
        call: The recorded call (with its cotangents).
        computing: Context for every evaluation: the float64 guard, compiled code run eagerly.
        include_param: Whether a parameter (by its full name) may be perturbed.
        prefix: The module's name (for full parameter names).
    """

    def __init__(
        self,
        call: ModuleCall,
        computing: Callable[[], AbstractContextManager[Any]],
        include_param: Callable[[str], bool],
        prefix: str,
    ) -> None:
        self.call = call
        self.computing = computing
        module = call.module
        leaves = tensor_leaves((call.args, call.kwargs))
        self.inputs = leaves
        self.input_slots = [k for k, need in enumerate(call.needs_grad) if need]
        full = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        own = [
            (n, p)
            for n, p in module.named_parameters(recurse=False)
            if p.requires_grad and p.is_floating_point() and include_param(full(n))
        ]
        own_ids = {id(p) for _, p in own}
        inner = [
            p
            for n, p in module.named_parameters()
            if id(p) not in own_ids
            and p.requires_grad
            and p.is_floating_point()
            and include_param(full(n))
        ]
        self.own = own
        self.inner = inner
        names = ["input" if len(self.input_slots) == 1 else f"input[{k}]" for k in self.input_slots]
        names += [n for n, _ in own] + ([INNER] if inner else [])
        self._names = names
        self._base = float("nan")
        self._grads: list[npt.NDArray[np.float64] | None] = []
        self.evaluations = 0
        #: Evaluate with autograd on (the module registers tensor hooks in its forward).
        self.with_grad = False

    # -- Problem protocol ----------------------------------------------------------------------
    @property
    def names(self) -> Sequence[str]:
        return self._names

    @property
    def shapes(self) -> Sequence[tuple[int, ...]]:
        return [tuple(v.shape) for v in (self.values(k) for k in range(len(self._names)))]

    @property
    def dtype(self) -> np.dtype[np.floating[Any]]:
        return np.dtype(np.float64)

    @property
    def base_loss(self) -> float:
        return self._base

    def values(self, tensor: int) -> npt.NDArray[np.floating[Any]]:
        return self._slot_value(tensor).detach().cpu().numpy().copy()

    def gradient(self, tensor: int) -> npt.NDArray[np.floating[Any]] | None:
        return self._grads[tensor]

    def excluded(self, tensor: int) -> npt.NDArray[np.bool_] | None:
        """An embedding's ``padding_idx`` row among the slot's parameters (torch defines its
        gradient as zero; see :func:`~gradwatch.torch.twin.padding_rows`)."""
        params = self._params_of(tensor)
        rows = padding_rows(self.call.module)
        if not any(id(p) in rows for p in params):
            return None
        parts = [rows.get(id(p), np.zeros(tuple(p.shape), dtype=bool)).reshape(-1) for p in params]
        return np.concatenate(parts).reshape(tuple(self.shapes[tensor]))

    def losses(self, perturbations: Sequence[Perturbation]) -> npt.NDArray[np.float64]:
        out = np.empty(len(perturbations), dtype=np.float64)
        if any(pert.index is not None for pert in perturbations):
            raise ValueError("a local check perturbs along directions only")

        def run() -> None:
            with evaluation_grad_mode(self):
                for k, pert in enumerate(perturbations):
                    out[k] = float(self._evaluate({pert.tensor: pert.value}).item())

        retrying_with_grad(self, run)
        return out

    # -- slots ---------------------------------------------------------------------------------
    def _slot_value(self, slot: int) -> torch.Tensor:
        n_in, n_own = len(self.input_slots), len(self.own)
        if slot < n_in:
            return self.inputs[self.input_slots[slot]]
        if slot < n_in + n_own:
            return self.own[slot - n_in][1]
        return torch.cat([p.detach().reshape(-1) for p in self.inner])

    def _params_of(self, slot: int) -> list[nn.Parameter]:
        n_in, n_own = len(self.input_slots), len(self.own)
        if slot < n_in:
            return []
        if slot < n_in + n_own:
            return [self.own[slot - n_in][1]]
        return list(self.inner)

    # -- evaluation ----------------------------------------------------------------------------
    def compute_base(self) -> None:
        """``f`` at the recorded point and its autodiff gradient along every slot."""
        leaves = [x.clone() for x in self.inputs]
        for k in self.input_slots:
            leaves[k].requires_grad_(True)
        # The buffers are put back only after the backward: BatchNorm's backward holds its
        # running statistics and refuses to run once they were written in place.
        try:
            with torch.enable_grad():
                f = self._evaluate({}, leaves, restore_buffers=False)
                wrt = [leaves[k] for k in self.input_slots] + [p for _, p in self.own] + self.inner
                grads: list[torch.Tensor | None] = [None] * len(wrt)
                if f.requires_grad:
                    grads = list(torch.autograd.grad(f, wrt, allow_unused=True))
        finally:
            self._restore_buffers()
        self._base = float(f.detach().item())
        n_fixed = len(self.input_slots) + len(self.own)
        # An embedding with sparse=True gets a sparse weight gradient: compare it densely.
        host = [
            None
            if g is None
            else (g.to_dense() if g.layout != torch.strided else g).detach().cpu().double().numpy()
            for g in grads
        ]
        self._grads = list(host[:n_fixed])
        if self.inner:
            rest = host[n_fixed:]
            if all(g is None for g in rest):
                self._grads.append(None)
            else:
                parts = [
                    np.zeros(p.numel()) if g is None else g.ravel()
                    for g, p in zip(rest, self.inner, strict=True)
                ]
                self._grads.append(np.concatenate(parts))

    def _evaluate(
        self,
        perturbed: dict[int, npt.NDArray[np.floating[Any]]],
        leaves: list[torch.Tensor] | None = None,
        *,
        restore_buffers: bool = True,
    ) -> torch.Tensor:
        """``<cotangent, module(inputs; params)>`` with some slots set to perturbed values
        (``restore_buffers=False``: the caller puts the buffers back after its backward)."""
        self.evaluations += 1
        call = self.call
        if leaves is None:
            leaves = [x.clone() for x in self.inputs]
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            for slot, value in perturbed.items():
                self._write(slot, value, leaves, saved)
            devices = [index for index, _ in call.cuda_rng]
            with torch.random.fork_rng(devices=devices), self.computing():
                torch.set_rng_state(call.rng)
                for index, state in call.cuda_rng:
                    torch.cuda.set_rng_state(state, index)
                self._restore_buffers()
                # A clone of each input leaf: an in-place module writes into the clone. With
                # autograd on (hooks in forward), the inputs that carried a gradient carry one.
                fed = iter(
                    [
                        x.detach().clone().requires_grad_(True)
                        if self.with_grad and k in self.input_slots
                        else x.clone()
                        if x.requires_grad
                        else x
                        for k, x in enumerate(leaves)
                    ]
                )
                args, kwargs = with_leaves((call.args, call.kwargs), fed)
                out = call.module(*args, **kwargs)
                return self._dot(out)
        finally:
            with torch.no_grad():
                for p, kept in saved:
                    p.copy_(kept)
            if restore_buffers:
                self._restore_buffers()

    def _write(
        self,
        slot: int,
        value: npt.NDArray[np.floating[Any]],
        leaves: list[torch.Tensor],
        saved: list[tuple[nn.Parameter, torch.Tensor]],
    ) -> None:
        n_in = len(self.input_slots)
        if slot < n_in:
            k = self.input_slots[slot]
            x = leaves[k]
            # Keep the recorded memory layout: dropout draws its mask in memory order.
            moved = x.detach().clone()
            moved.copy_(torch.as_tensor(np.asarray(value), dtype=x.dtype, device=x.device))
            leaves[k] = moved
            return
        flat = torch.as_tensor(np.asarray(value).reshape(-1), dtype=torch.float64)
        offset = 0
        with torch.no_grad():
            for p in self._params_of(slot):
                saved.append((p, p.detach().clone()))
                part = flat[offset : offset + p.numel()].reshape(p.shape)
                p.copy_(part.to(device=p.device, dtype=p.dtype))
                offset += p.numel()

    def _dot(self, out: Any) -> torch.Tensor:
        outputs = [t for t in tensor_leaves(out) if t.is_floating_point()]
        total: torch.Tensor | None = None
        for position, t in enumerate(outputs):
            cot = self.call.cotangents.get(position)
            if cot is None or cot.shape != t.shape:
                continue
            term = (t * cot.to(t.dtype)).sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no output of the call received a cotangent")
        return total

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for buf, saved in zip(self.call.module.buffers(), self.call.buffers, strict=False):
                buf.copy_(saved)
