"""Per-tensor gradient norms of the parameters an optimizer steps: one fused reduction, on the device."""

from __future__ import annotations

import math
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

    def weight_vector(self, device: torch.device) -> torch.Tensor:
        """L2 norm of every watched parameter (``params`` order) on ``device``: one fused reduction.

        Read with the block's gradient norms for the relative vanishing rule (``‖g‖/‖w‖``).
        """
        if not self.params:
            return torch.zeros(0, device=device)
        values = [p.detach() for _, p in self.params]
        norms = [x.to(device=device, dtype=torch.float32) for x in _compat.foreach_norm(values)]
        return torch.stack(norms)

    @staticmethod
    def names(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[str, ...]:
        """The order of :meth:`vector`'s entries: dense gradients first, then sparse ones."""
        return tuple(n for n, g in named if not g.is_sparse) + tuple(
            n for n, g in named if g.is_sparse
        )

    @staticmethod
    def vector(
        named: Sequence[tuple[str, torch.Tensor]], scale: float = 1.0, *, wide: bool = False
    ) -> torch.Tensor:
        """L2 norm of every gradient divided by ``scale``, in :meth:`names` order, on the device.

        One fused reduction per device/dtype, squares accumulated in float32 or wider; nothing is
        read to the host. A float32 norm above ~1.8e19 overflows to ``inf``: :meth:`exact` tells
        such norms from non-finite gradients; ``wide`` sums the squares in float64 instead (cheap
        on accelerators, about ten times the float32 cost on CPUs).
        """
        dense = [g for _, g in named if not g.is_sparse]
        values: list[torch.Tensor] = []
        if dense:
            values.extend(_compat.foreach_norm(dense, torch.float64 if wide else None))
        values.extend(
            torch.linalg.vector_norm(g.coalesce().values(), dtype=torch.float64 if wide else None)
            for _, g in named
            if g.is_sparse
        )
        try:
            stacked = torch.stack(values)  # promotes mixed dtypes
        except RuntimeError:  # tensors on several devices
            first = values[0]
            wide_dtype = torch.float64 if wide else torch.float32
            stacked = torch.stack([x.to(device=first.device, dtype=wide_dtype) for x in values])
        if stacked.dtype != torch.float32 and not wide:
            stacked = stacked.float()
        return stacked / scale if scale != 1.0 else stacked

    @staticmethod
    def exact(
        named: Sequence[tuple[str, torch.Tensor]], vector: torch.Tensor, scale: float = 1.0
    ) -> list[float]:
        """:meth:`vector` read to the host, its ``inf`` entries recomputed in float64.

        A finite gradient whose float32 norm overflowed gets its true (finite) norm; a gradient
        holding NaN or inf keeps its non-finite norm. Only called on a step whose norms are not
        calm, so the float64 pass costs nothing on healthy steps.
        """
        host: list[float] = vector.tolist()
        order = [g for _, g in named if not g.is_sparse] + [g for _, g in named if g.is_sparse]
        for i, value in enumerate(host):
            if value == math.inf:
                g = order[i]
                values = g.coalesce().values() if g.is_sparse else g
                host[i] = float(torch.linalg.vector_norm(values.detach().double())) / scale
        return host

    @staticmethod
    def norms(named: Sequence[tuple[str, torch.Tensor]], scale: float = 1.0) -> dict[str, float]:
        """Every gradient's L2 norm divided by ``scale``, read to the host (exact, see :meth:`exact`)."""
        if not named:
            return {}
        vector = GradNorms.vector(named, scale)
        return dict(zip(GradNorms.names(named), GradNorms.exact(named, vector, scale), strict=True))

    @staticmethod
    def histograms(named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, npt.NDArray[np.float32]]:
        """Finite gradient values per tensor (tensors holding a NaN or inf are left out)."""
        out = {}
        for name, g in named:
            values = (g.coalesce().values() if g.is_sparse else g).detach().float().cpu()
            if torch.isfinite(values).all():
                out[name] = values.numpy()
        return out
