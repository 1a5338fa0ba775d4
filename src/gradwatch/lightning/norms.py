"""Per-tensor gradient norms of the parameters an optimizer steps: one fused reduction, one read."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from gradwatch.torch import _compat

__all__ = ["GradNorms"]


class GradNorms:
    """The watched parameters (model order) and their gradient norms per optimizer.

    Args:
        params: ``(name, parameter)`` of every watched parameter, in model order.
    """

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]]) -> None:
        self.params = list(params)
        self._owned: dict[int, tuple[tuple[int, int, int], list[tuple[str, nn.Parameter]]]] = {}

    def owned(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
        """The watched parameters this optimizer steps (cached until its groups change)."""
        groups = optimizer.param_groups
        key = (id(optimizer), len(groups), sum(len(g["params"]) for g in groups))
        cached = self._owned.get(key[0])
        if cached is None or cached[0] != key:
            ids = {id(p) for g in groups for p in g["params"]}
            cached = (key, [(n, p) for n, p in self.params if id(p) in ids])
            self._owned[key[0]] = cached
        return cached[1]

    def grads(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
        """``(name, .grad)`` of the optimizer's watched parameters that have a gradient."""
        return [(n, p.grad) for n, p in self.owned(optimizer) if p.grad is not None]

    @staticmethod
    def norms(named: Sequence[tuple[str, torch.Tensor]], scale: float = 1.0) -> dict[str, float]:
        """L2 norm of every gradient divided by ``scale``: one fused reduction per device/dtype,
        squares accumulated in float32 or wider, one host transfer."""
        dense = [(n, g) for n, g in named if not g.is_sparse]
        sparse = [(n, g) for n, g in named if g.is_sparse]
        values: list[torch.Tensor] = []
        if dense:
            values.extend(_compat.foreach_norm([g for _, g in dense]))
        for _, g in sparse:
            values.append(torch.linalg.vector_norm(g.coalesce().values()))
        if not values:
            return {}
        try:
            stacked = torch.stack(values)  # promotes mixed dtypes
        except RuntimeError:  # tensors on several devices
            first = values[0]
            stacked = torch.stack([x.to(device=first.device, dtype=torch.float32) for x in values])
        if stacked.dtype != torch.float32 or stacked.device.type != "cpu":
            stacked = stacked.float().cpu()
        host = stacked.tolist()
        if scale != 1.0:
            host = [x / scale for x in host]
        names = [n for n, _ in dense] + [n for n, _ in sparse]
        return dict(zip(names, host, strict=True))

    @staticmethod
    def histograms(named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, npt.NDArray[np.float32]]:
        """Finite gradient values per tensor (tensors holding a NaN or inf are left out)."""
        out = {}
        for name, g in named:
            values = (g.coalesce().values() if g.is_sparse else g).detach().float().cpu()
            if torch.isfinite(values).all():
                out[name] = values.numpy()
        return out
