"""The module a check computes on: a float64 copy kept in sync, or the model itself, restored.

Also the batch side of a check: floating tensors cast to the check dtype, integer tensors kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwatch import options as v
from gradwatch.torch import _compat

__all__ = [
    "Twin",
    "cast_batch",
    "clean_name",
    "named_trainable",
    "padding_rows",
    "uncastable",
    "unwrap_module",
]


def clean_name(name: str) -> str:
    """Parameter name without ``torch.compile``'s ``_orig_mod.`` prefix.

    Example:
        >>> clean_name("_orig_mod.fc.weight")
        'fc.weight'
    """
    return name.replace("_orig_mod.", "")


def unwrap_module(model: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = _compat.compiled_original(model)
        if inner is not None:
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
            continue
        break
    return model


def cast_batch(batch: Any, dtype: torch.dtype | None, device: torch.device | None) -> Any:
    """Cast floating tensors in a (nested) batch to ``dtype``/``device``; other tensors only move.

    Tuples, lists, named tuples and mappings are walked; any other object is passed as it is.

    Example:
        >>> b = cast_batch({"x": torch.ones(2), "ids": torch.tensor([1, 2])}, torch.float64, None)
        >>> b["x"].dtype, b["ids"].dtype
        (torch.float64, torch.int64)
    """
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point() and dtype is not None:
            return batch.detach().to(device=device, dtype=dtype)
        return batch.detach().to(device=device) if device is not None else batch.detach()
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(cast_batch(b, dtype, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(cast_batch(b, dtype, device) for b in batch)
    if isinstance(batch, Mapping):
        try:
            return type(batch)({k: cast_batch(x, dtype, device) for k, x in batch.items()})  # type: ignore[call-arg]
        except TypeError:
            return {k: cast_batch(x, dtype, device) for k, x in batch.items()}
    return batch


def uncastable(batch: Any) -> list[str]:
    """Type names of leaves that may hold tensors :func:`cast_batch` cannot reach."""
    if isinstance(batch, torch.Tensor) or batch is None:
        return []
    if isinstance(batch, (tuple, list)):
        return [t for b in batch for t in uncastable(b)]
    if isinstance(batch, Mapping):
        return [t for b in batch.values() for t in uncastable(b)]
    if isinstance(batch, (int, float, str, bytes, bool, np.ndarray)):
        return []
    if any(isinstance(x, torch.Tensor) for x in getattr(batch, "__dict__", {}).values()):
        return [type(batch).__name__]
    return []


class Twin:
    """The module the check computes on: a dtype copy kept in sync, or the model itself."""

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        prepare: Callable[[nn.Module, nn.Module], None] | None = None,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.notes: list[str] = []
        self.device = self._device(model)
        self.in_place = False
        self.module: nn.Module
        params = list(model.parameters())
        same = all(
            (p.dtype == dtype or not p.is_floating_point()) and p.device == self.device
            for p in params
        )
        if same:
            self.module, self.in_place = model, True
        else:
            try:
                twin = copy.deepcopy(model)
            except Exception as exc:
                self.module, self.in_place = model, True
                self.notes.append(
                    f"the model could not be copied ({type(exc).__name__}: {exc}); it was "
                    f"converted to {str(dtype).replace('torch.', '')} in place and restored"
                )
            else:
                for p in twin.parameters():
                    p.grad = None
                # A compiled submodule would be recompiled by float64 inputs (and count against
                # Dynamo's recompile limit): the copy computes through the eager originals.
                _compat.uncompiled_children(twin)
                # A submodule hidden by an attribute that __setstate__ made (a Transformer
                # layer's module activation comes back as F.relu) would be another function.
                _compat.unshadow_submodules(model, twin)
                twin.to(device=self.device, dtype=dtype)
                self.module = twin
        if prepare is not None and not self.in_place:
            prepare(model, self.module)
        self._saved: list[tuple[Any, str, torch.Tensor | None, Any]] = []

    @staticmethod
    def _device(model: nn.Module) -> torch.device:
        for p in model.parameters():
            if p.device.type == "mps":
                return torch.device("cpu")  # MPS has no float64: the copy lives on the CPU
            return p.device
        return torch.device("cpu")

    @contextmanager
    def synced(self) -> Iterator[nn.Module]:
        """The module to compute on, holding the model's current values; restored on exit."""
        if not self.in_place:
            with torch.no_grad():
                for dst, src in zip(self.module.parameters(), self.model.parameters(), strict=True):
                    dst.copy_(src)
                for dst_buf, src_buf in zip(
                    self.module.buffers(), self.model.buffers(), strict=True
                ):
                    dst_buf.copy_(src_buf)
            yield self.module
            return
        needs_cast = any(
            p.is_floating_point() and p.dtype != self.dtype for p in self.model.parameters()
        )
        if not needs_cast:
            saved = [p.detach().clone() for p in self.model.parameters()]
            try:
                yield self.model
            finally:
                with torch.no_grad():
                    for p, s in zip(self.model.parameters(), saved, strict=True):
                        p.copy_(s)
            return
        # In place with a dtype change: swap in converted data, keep the original tensors (and
        # leave .grad alone), and put the originals back.
        params = [p for _, _, p in _compat.module_parameter_slots(self.model) if p is not None]
        originals = [p.data for p in params]
        buffers = [
            (m, k, t) for m, k, t in _compat.module_buffer_slots(self.model) if t is not None
        ]
        try:
            for p in params:
                if p.is_floating_point():
                    p.data = p.data.to(device=self.device, dtype=self.dtype)
            for m, k, t in buffers:
                if t.is_floating_point():
                    _compat.set_module_buffer(m, k, t.to(device=self.device, dtype=self.dtype))
            yield self.model
        finally:
            for p, data in zip(params, originals, strict=True):
                p.data = data
            for m, k, t in buffers:
                _compat.set_module_buffer(m, k, t)


def padding_rows(module: nn.Module) -> dict[int, np.ndarray]:
    """Masks of the embedding rows ``padding_idx`` names, by ``id`` of the weight.

    torch gives that row no gradient by design (it "does not contribute to the gradient"),
    although a padded batch's loss depends on it: a check leaves those entries alone.

    Example:
        >>> emb = torch.nn.Embedding(3, 2, padding_idx=0)
        >>> padding_rows(emb)[id(emb.weight)].tolist()
        [[True, True], [False, False], [False, False]]
    """
    rows = {}
    for m in module.modules():
        pad = getattr(m, "padding_idx", None)
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and pad is not None:
            mask = np.zeros(tuple(m.weight.shape), dtype=bool)
            mask[pad] = True
            rows[id(m.weight)] = mask
    return rows


def named_trainable(
    model: nn.Module, include: Sequence[Any], exclude: Sequence[Any]
) -> list[tuple[str, nn.Parameter]]:
    trainable = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [(n, p) for n, p in trainable if p.is_floating_point()]
    if not trainable:
        raise ValueError(
            "the model has no trainable floating-point parameters (requires_grad=True); "
            "there is nothing to check"
        )
    v.check_selection([n for n, _ in trainable], include, exclude)
    return [(n, p) for n, p in trainable if v.selected(n, include, exclude)]
