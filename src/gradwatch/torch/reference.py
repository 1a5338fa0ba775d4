"""The model's own loss and gradient, in its own precision, leaving no trace: what a float64
evaluation is compared with before a check believes it (:mod:`gradwatch.core.fidelity`).

One forward and one backward of the model itself at the check's seed: the loss and
``torch.autograd.grad`` of the checked tensors (``.grad`` is never written), with every buffer
(BatchNorm running statistics), the RNG streams and the modules' plain Python attributes (lists a
``training_step`` appends to, counters, cached tensors) put back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradwatch.core.fidelity import Agreement, agreement
from gradwatch.torch import _compat
from gradwatch.torch.evaluate import Evaluator, LossFn, host_rng_preserved

__all__ = ["OwnPass", "compare", "module_state_kept", "own_pass"]

#: ``nn.Module`` slots that hold its tensors and submodules (put back by other means).
_TENSOR_SLOTS = _compat.module_attribute_slots()


@dataclass(frozen=True)
class OwnPass:
    """The model's own loss and gradient at the check's point, batch and seed.

    Attributes:
        loss: The loss, as a Python float.
        grads: ``autograd.grad`` of the loss for each checked tensor (``None``: no path).
        precision: The lowest floating dtype the pass computed in (saved for backward, the
            loss, the parameters): ``torch.bfloat16`` under a bf16 autocast.
    """

    loss: float
    grads: list[torch.Tensor | None]
    precision: torch.dtype


def _snapshot(value: Any) -> Any:
    """What :func:`module_state_kept` needs to put a plain attribute's contents back."""
    if type(value) in (list, dict, set):
        return type(value)(value)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        return value.detach().clone()
    return None


def _put_back(value: Any, saved: Any) -> None:
    if saved is None:
        return
    if isinstance(value, list):
        value[:] = saved
    elif isinstance(value, (dict, set)):
        value.clear()
        value.update(saved)
    elif isinstance(value, torch.Tensor) and value.shape == saved.shape:
        with torch.no_grad():
            value.copy_(saved)


@contextlib.contextmanager
def module_state_kept(model: nn.Module) -> Iterator[None]:
    """Every module's plain attributes as they were on entry, when the block exits.

    Attributes added are removed, rebound ones rebound, and the contents of lists, dicts, sets
    and plain tensor attributes put back (``self.outputs.append(loss)`` in a ``training_step``,
    a torchmetrics state, a cached tensor). Parameters, buffers and submodules are not touched.

    Example:
        >>> m = torch.nn.Linear(1, 1)
        >>> m.seen = []
        >>> with module_state_kept(m):
        ...     m.seen.append(1)
        ...     m.extra = 2
        >>> m.seen, hasattr(m, "extra")
        ([], False)
    """
    saved = []
    for m in model.modules():
        attrs = {k: v for k, v in vars(m).items() if k not in _TENSOR_SLOTS}
        saved.append((m, attrs, {k: _snapshot(v) for k, v in attrs.items()}))
    try:
        yield
    finally:
        for m, attrs, contents in saved:
            state = vars(m)
            for key in [k for k in state if k not in attrs and k not in _TENSOR_SLOTS]:
                del state[key]
            for key, value in attrs.items():
                state[key] = value
                _put_back(value, contents[key])


def own_pass(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    batch: Any,
    loss_fn: LossFn,
    *,
    seed: int,
    context: Callable[[], AbstractContextManager[Any]] | None = None,
) -> OwnPass:
    """``loss_fn(model, batch)`` and its gradient for ``params``, in the model's own precision.

    Seeded like the check's evaluations (the same dropout masks), under ``context`` (Lightning:
    the trainer's autocast and silenced logging). Leaves parameters, ``.grad``, buffers, RNG
    streams and the modules' Python attributes as they were.

    Example:
        >>> m = torch.nn.Linear(3, 1)
        >>> out = own_pass(m, list(m.parameters()), torch.ones(2, 3),
        ...                lambda mod, x: mod(x).sum(), seed=0)
        >>> out.precision, m.weight.grad is None
        (torch.float32, True)
    """
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    dtypes: set[torch.dtype] = {p.dtype for p in params if p.is_floating_point()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            dtypes.add(t.dtype)
        return t

    try:
        with (
            host_rng_preserved(),
            torch.random.fork_rng(devices=devices),
            module_state_kept(model),
            _compat.compiled_code_run_eagerly(),
            context() if context is not None else contextlib.nullcontext(),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, _unpack),
        ):
            torch.default_generator.manual_seed(seed)
            for index in devices:
                torch.cuda.default_generators[index].manual_seed(seed)
            loss = Evaluator._loss_tensor(loss_fn(model, batch)).reshape(())
            dtypes.add(loss.dtype)
            grads: list[torch.Tensor | None] = [None] * len(params)
            if loss.requires_grad and params:
                found = torch.autograd.grad(loss, list(params), allow_unused=True)
                grads = [None if g is None else g.detach() for g in found]
            value = float(loss.detach().float().item())
    finally:
        with torch.no_grad():
            for b, s in buffers:
                b.copy_(s)
    lowest = max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32
    return OwnPass(loss=value, grads=grads, precision=lowest)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _dense(g: torch.Tensor) -> torch.Tensor:
    return (g.to_dense() if g.is_sparse else g).double()


def compare(
    names: Sequence[str],
    loss: float,
    grads: Sequence[torch.Tensor | None],
    own: OwnPass,
) -> Agreement:
    """A float64 evaluation's loss and gradient (``grads``) against the model's own pass.

    Example:
        >>> own = OwnPass(1.0, [torch.ones(2)], torch.float32)
        >>> compare(["w"], 1.0, [torch.ones(2, dtype=torch.float64) * 0.9], own).agrees
        False
    """
    norms = []
    for name, ours, theirs in zip(names, grads, own.grads, strict=True):
        if ours is None and theirs is None:
            continue
        a = torch.zeros((), dtype=torch.float64) if ours is None else _dense(ours)
        b = torch.zeros((), dtype=torch.float64) if theirs is None else _dense(theirs).to(a.device)
        norms.append(
            (
                name,
                float(torch.linalg.vector_norm(a)),
                float(torch.linalg.vector_norm(b)),
                float(torch.linalg.vector_norm(a - b)),
            )
        )
    return agreement(loss, own.loss, norms, str(own.precision).replace("torch.", ""))
