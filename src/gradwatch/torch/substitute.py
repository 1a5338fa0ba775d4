"""The model itself with float64 tensors swapped in: what a check evaluates when a copy is not the
model's function.

``torch.func.functional_call`` runs the user's own module with the given tensors in place of its
parameters and buffers and puts the originals back after each call, so the module's code — every
activation module ``copy.deepcopy`` would have replaced — is what computes. The tensors are fresh
float64 copies (perturbed in place by the check, BatchNorm statistics updated in them, never in the
model's). ``loss_fn(module, batch)`` is routed through a wrapper module, so any loss function
(Lightning: ``training_step``) runs on the model itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradwatch.torch.evaluate import LossFn
from gradwatch.torch.twin import clean_name

__all__ = ["Substituted"]


class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self._loss_fn(self.inner, batch)


class Substituted:
    """Float64 parameters and buffers for ``model``, and ``loss_fn`` evaluated through them.

    Args:
        model: The user's module (never changed).
        loss_fn: ``loss_fn(module, batch) -> loss``.
        dtype: The dtype of the substituted floating tensors.
        device: Where they live (the check's device).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> sub = Substituted(model, lambda m, x: m(x).sum(), torch.float64, torch.device("cpu"))
        >>> sub.loss_fn(model, torch.ones(1, 2, dtype=torch.float64)).dtype
        torch.float64
        >>> model.weight.dtype
        torch.float32
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, dtype: torch.dtype, device: torch.device
    ) -> None:
        self._wrapper = _LossOf(model, loss_fn)
        self._by_name: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            t = _fresh(p, dtype, device).requires_grad_(p.requires_grad and p.is_floating_point())
            self.state["inner." + name] = t
            self._by_name.setdefault(clean_name(name), t)
        self.buffers: list[torch.Tensor] = []
        for name, b in model.named_buffers():
            t = _fresh(b, dtype, device)
            self.state["inner." + name] = t
            self.buffers.append(t)

    def tensors(self, names: Sequence[str]) -> list[torch.Tensor]:
        """The substituted float64 tensors of the named parameters (names as the check has them)."""
        return [self._by_name[n] for n in names]

    def loss_fn(self, module: nn.Module, batch: Any) -> Any:
        """``loss_fn(model, batch)`` computed with the substituted tensors (``module`` is ignored:
        it is the model)."""
        return torch.func.functional_call(self._wrapper, self.state, (batch,))


def _fresh(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A detached copy of ``t`` on ``device``, in ``dtype`` if it is floating (never shared)."""
    target = dtype if t.is_floating_point() else t.dtype
    return t.detach().to(device=device, dtype=target, copy=True)
