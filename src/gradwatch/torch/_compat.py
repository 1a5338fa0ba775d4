"""Private torch attributes gradwatch relies on, in one place.

Each is read from torch 2.2-2.13 (the range ``pyproject.toml`` allows); ``tests/torch/test_compat.py``
fails loudly if one disappears, instead of gradwatch going silently wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "compiled_code_run_eagerly",
    "compiled_original",
    "copy_tensors",
    "foreach_norm",
    "module_attribute_slots",
    "module_buffer_slots",
    "module_parameter_slots",
    "optimizer_unscales_itself",
    "running_stat_buffers",
    "set_module_buffer",
    "uncompiled_children",
]


def compiled_original(model: nn.Module) -> nn.Module | None:
    """The eager module inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), else ``None``.

    Read from torch 2.2-2.13 (``torch/_dynamo/eval_frame.py``).
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def uncompiled_children(module: nn.Module) -> int:
    """Replace every ``torch.compile``d submodule of ``module`` by its eager original, in place.

    Meant for a private copy of the model (the check's float64 twin): its parameters stay the same
    objects and in the same order (the wrapper holds nothing but ``_orig_mod``). Returns how many
    wrappers were removed. Read from torch 2.2-2.13 (``nn.Module._modules``, ``_orig_mod``).
    """
    removed = 0
    for m in list(module.modules()):
        for key, child in list(m._modules.items()):
            inner = compiled_original(child) if child is not None else None
            while inner is not None:
                m._modules[key] = inner
                removed += 1
                child, inner = inner, compiled_original(inner)
    return removed


@contextlib.contextmanager
def compiled_code_run_eagerly() -> Iterator[None]:
    """``torch.compile``d functions and modules run their eager code and compile nothing.

    ``torch.compiler.set_stance("force_eager")`` (torch 2.6 and later); on older torch nothing
    changes (the check's copy has its compiled submodules unwrapped anyway).
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


def foreach_norm(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None
) -> Sequence[torch.Tensor]:
    """L2 norm of each tensor in one fused kernel per device/dtype (``torch._foreach_norm``),
    accumulated in ``dtype`` where given.

    Read from torch 2.2-2.13 (``dtype`` where the installed torch accepts it, else a norm of the
    widened tensors); raises on sparse tensors (take those apart).
    """
    if dtype is None:
        return torch._foreach_norm(list(tensors))
    try:
        return torch._foreach_norm(list(tensors), 2, dtype=dtype)
    except TypeError:  # a torch without the dtype argument
        return [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]


def module_parameter_slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, Any]]:
    """``(module, name, parameter)`` for every parameter slot of every submodule (``_parameters``).

    Read from torch 2.2-2.13 (``nn.Module._parameters``); slots holding ``None`` are included.
    """
    for m in module.modules():
        for key, p in m._parameters.items():
            yield m, key, p


def module_buffer_slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, Any]]:
    """``(module, name, buffer)`` for every buffer slot of every submodule (``_buffers``).

    Read from torch 2.2-2.13 (``nn.Module._buffers``); slots holding ``None`` are included.
    """
    for m in module.modules():
        for key, b in m._buffers.items():
            yield m, key, b


def module_attribute_slots() -> frozenset[str]:
    """The keys of an ``nn.Module``'s ``__dict__`` that hold its parameters, buffers and submodules.

    Read from torch 2.2-2.13 (``_parameters``, ``_buffers``, ``_modules``): everything else in
    ``vars(module)`` is a plain attribute.
    """
    return frozenset({"_parameters", "_buffers", "_modules"})


def set_module_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a buffer tensor without registering a new one (``_buffers[name] = value``)."""
    module._buffers[name] = value


def optimizer_unscales_itself(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer unscales a ``GradScaler``'s gradients inside ``step()`` (fused Adam...).

    Read from torch 2.2-2.13 (``Optimizer._step_supports_amp_scaling``): for such optimizers the
    gradients seen before ``step()`` are still scaled.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def running_stat_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics a forward pass in train mode updates (BatchNorm, SyncBatchNorm,
    InstanceNorm with ``track_running_stats``): ``running_mean``, ``running_var``,
    ``num_batches_tracked``.

    Read from torch 2.2-2.13 (``torch.nn.modules.batchnorm._NormBase``).
    """
    from torch.nn.modules.batchnorm import _NormBase

    out: list[torch.Tensor] = []
    for m in module.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                b = getattr(m, name, None)
                if isinstance(b, torch.Tensor):
                    out.append(b)
    return out


def copy_tensors(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all, fused per device/dtype (``torch._foreach_copy_``).

    Read from torch 2.2-2.13.
    """
    if dst:
        torch._foreach_copy_(list(dst), list(src))


def unshadow_submodules(original: nn.Module, copy: nn.Module) -> int:
    """Drop instance attributes of ``copy`` that hide a submodule the original reaches (returns how many).

    ``nn.TransformerEncoderLayer``/``DecoderLayer.__setstate__`` puts ``activation = F.relu`` into
    the instance ``__dict__`` when the state has no plain ``activation`` attribute, which is the
    case when the activation is a module (it lives in ``_modules``): a deep copy then computes
    ReLU, not the model's activation. Read from torch 2.2-2.13 (``nn.Module._modules``; ordinary
    attribute lookup finds ``__dict__`` before ``nn.Module.__getattr__`` looks in ``_modules``).
    """
    dropped = 0
    for a, b in zip(original.modules(), copy.modules(), strict=False):
        for name in list(b._modules):
            if name in vars(b) and name not in vars(a):
                del vars(b)[name]
                dropped += 1
    return dropped
