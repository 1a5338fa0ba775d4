"""PyTorch adapter: ``check_gradients`` / ``assert_gradients`` for any ``torch.nn.Module``.

The check runs on a float64 twin of the model (a deep copy; where a model cannot be copied, the
model itself is converted and restored exactly), reseeds every loss evaluation from a private seed
inside ``torch.random.fork_rng``, restores buffers after every evaluation and never touches
``.grad``: parameters, buffers, RNG streams and gradients are bit-identical after the call.

Example:
    >>> import torch
    >>> from gradwatch.torch import check_gradients
    >>> model = torch.nn.Linear(3, 2)
    >>> batch = (torch.randn(4, 3), torch.randn(4, 2))
    >>> def loss_fn(m, b):
    ...     x, y = b
    ...     return torch.nn.functional.mse_loss(m(x), y)
    >>> check_gradients(model, batch, loss_fn).verdict
    'pass'
"""

from __future__ import annotations

import copy
import functools
import logging
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from gradwatch import _validate as v
from gradwatch.core.check import Perturbation, check_problem
from gradwatch.errors import GradientCheckError
from gradwatch.report import CheckReport

__all__ = [
    "TorchChecker",
    "assert_gradients",
    "cast_batch",
    "check_gradients",
    "clean_name",
    "unwrap_module",
]

LossFn = Callable[[nn.Module, Any], Any]

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

_NP_DTYPES: dict[torch.dtype, type[np.floating[Any]]] = {
    torch.float64: np.float64,
    torch.float32: np.float32,
}


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
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
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


def _uncastable(batch: Any) -> list[str]:
    """Type names of leaves that may hold tensors :func:`cast_batch` cannot reach."""
    if isinstance(batch, torch.Tensor) or batch is None:
        return []
    if isinstance(batch, (tuple, list)):
        return [t for b in batch for t in _uncastable(b)]
    if isinstance(batch, Mapping):
        return [t for b in batch.values() for t in _uncastable(b)]
    if isinstance(batch, (int, float, str, bytes, bool, np.ndarray)):
        return []
    if any(isinstance(x, torch.Tensor) for x in getattr(batch, "__dict__", {}).values()):
        return [type(batch).__name__]
    return []


def _np_dtype(dtype: torch.dtype) -> type[np.floating[Any]]:
    return _NP_DTYPES.get(dtype, np.float32)


@contextmanager
def _host_rng_preserved() -> Iterator[None]:
    """Keep Python's and numpy's global RNG streams as they were (a loss_fn may draw from them)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@dataclass
class _Batching:
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


class _Evaluator:
    """Loss evaluations on a module, deterministic and leaving no trace (the engine's ``Problem``)."""

    def __init__(
        self,
        module: nn.Module,
        names: list[str],
        params: list[nn.Parameter],
        batch: Any,
        loss_fn: LossFn,
        seed: int,
        dtype: torch.dtype,
        batching: dict[str, _Batching] | None = None,
        force_vmap: bool = False,
    ) -> None:
        self.module = module
        self._names = names
        self.params = params
        self.batch = batch
        self.loss_fn = loss_fn
        self.seed = seed
        self.torch_dtype = dtype
        self.np_dtype = np.dtype(_np_dtype(dtype))
        self.devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        self.buffers = [(b, b.detach().clone()) for b in module.buffers()]
        self._base: float = float("nan")
        self._grads: list[torch.Tensor | None] = []
        self.evaluations = 0
        #: Per-tensor vmap plans (shared with the checker across checks); ``None``: loop only.
        self.batching = batching
        self.force_vmap = force_vmap
        self._activation_bytes = 0
        self._wrapper: _LossModule | None = None

    # -- Problem protocol ------------------------------------------------------------------
    @property
    def names(self) -> Sequence[str]:
        return self._names

    @property
    def shapes(self) -> Sequence[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.params]

    @property
    def dtype(self) -> np.dtype[np.floating[Any]]:
        return self.np_dtype

    @property
    def base_loss(self) -> float:
        return self._base

    def values(self, tensor: int) -> npt.NDArray[np.floating[Any]]:
        return self.params[tensor].detach().cpu().numpy().copy()

    def gradient(self, tensor: int) -> npt.NDArray[np.floating[Any]] | None:
        g = self._grads[tensor]
        return None if g is None else g.cpu().numpy()

    def losses(self, perturbations: Sequence[Perturbation]) -> npt.NDArray[np.float64]:
        out = np.empty(len(perturbations), dtype=np.float64)
        groups: dict[int, list[int]] = {}
        for k, pert in enumerate(perturbations):
            groups.setdefault(pert.tensor, []).append(k)
        with torch.no_grad():
            for tensor, ks in groups.items():
                out[ks] = self._group_losses(tensor, [perturbations[k] for k in ks])
        return out

    # -- one tensor's perturbations: the loop or vmap ------------------------------------------
    def _group_losses(self, tensor: int, perts: list[Perturbation]) -> npt.NDArray[np.float64]:
        name = self._names[tensor]
        plan = None if self.batching is None else self.batching.get(name)
        if plan is None and self.batching is not None:
            plan = self.batching[name] = _Batching(forced=self.force_vmap)
        if plan is None or plan.mode == "loop" or len(perts) < VMAP_MIN_GROUP:
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

    def _loop(self, perturbations: Sequence[Perturbation]) -> npt.NDArray[np.float64]:
        out = np.empty(len(perturbations), dtype=np.float64)
        for k, pert in enumerate(perturbations):
            p = self.params[pert.tensor]
            value = torch.as_tensor(np.asarray(pert.value), dtype=p.dtype, device=p.device)
            if pert.index is None:
                saved = p.detach().clone()
                p.copy_(value)
                try:
                    out[k] = self._loss_value(self._call())
                finally:
                    p.copy_(saved)
            else:
                saved = p[pert.index].detach().clone()
                p[pert.index] = value
                try:
                    out[k] = self._loss_value(self._call())
                finally:
                    p[pert.index] = saved
        return out

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
        self, tensor: int, perts: Sequence[Perturbation], plan: _Batching, chunk: int
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
        plan: _Batching,
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

    @contextmanager
    def _seed(self) -> Iterator[None]:
        """The evaluation seed on every generator in use; the caller's RNG streams untouched."""
        with torch.random.fork_rng(devices=self.devices):
            torch.default_generator.manual_seed(self.seed)
            for index in self.devices:
                torch.cuda.default_generators[index].manual_seed(self.seed)
            yield

    def _seeded(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the evaluation seed, every buffer put back afterwards."""
        try:
            with self._seed():
                return fn()
        finally:
            self.restore_buffers()

    # -- evaluation --------------------------------------------------------------------------
    def _call(self, restore: bool = True) -> Any:
        self.evaluations += 1
        if restore:
            return self._seeded(lambda: self.loss_fn(self.module, self.batch))
        with self._seed():
            return self.loss_fn(self.module, self.batch)

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)

    @staticmethod
    def _loss_tensor(out: Any) -> torch.Tensor:
        if isinstance(out, Mapping) and "loss" in out:
            out = out["loss"]
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"loss_fn must return a scalar tensor (or a dict with 'loss'), got {type(out).__name__}"
            )
        if out.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got a tensor of shape {tuple(out.shape)}"
            )
        return out

    def _loss_value(self, out: Any) -> float:
        return float(self._loss_tensor(out).detach().reshape(()).item())

    def compute_base(self) -> None:
        # Buffers are restored only after the backward pass: BatchNorm saves its running
        # statistics for backward, and writing them first would trip autograd's version check.
        saved_bytes = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved_bytes[0] += t.numel() * t.element_size()
            return t

        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                loss = self._loss_tensor(self._call(restore=False)).reshape(())
                self._base = float(loss.detach().item())
                if loss.requires_grad:
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                else:
                    grads = tuple(None for _ in self.params)  # type: ignore[misc]
        finally:
            self.restore_buffers()
        # What one forward keeps for backward: the estimate of a batched evaluation's memory.
        self._activation_bytes = saved_bytes[0]
        self._grads = [
            None if g is None else (g.to_dense() if g.is_sparse else g).detach() for g in grads
        ]


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class _Twin:
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
        mods = list(self.model.modules())
        params = [p for m in mods for p in m._parameters.values() if p is not None]
        originals = [p.data for p in params]
        buffers = [(m, k, t) for m in mods for k, t in m._buffers.items() if t is not None]
        try:
            for p in params:
                if p.is_floating_point():
                    p.data = p.data.to(device=self.device, dtype=self.dtype)
            for m, k, t in buffers:
                if t.is_floating_point():
                    m._buffers[k] = t.to(device=self.device, dtype=self.dtype)
            yield self.model
        finally:
            for p, data in zip(params, originals, strict=True):
                p.data = data
            for m, k, t in buffers:
                m._buffers[k] = t


def _named_trainable(
    model: nn.Module, include: Sequence[Any], exclude: Sequence[Any]
) -> list[tuple[str, nn.Parameter]]:
    trainable = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [(n, p) for n, p in trainable if p.is_floating_point()]
    if not trainable:
        raise ValueError(
            "the model has no trainable floating-point parameters (requires_grad=True); "
            "there is nothing to check"
        )
    chosen = [(n, p) for n, p in trainable if v.selected(n, include, exclude)]
    if not chosen:
        raise ValueError(
            f"include/exclude left no parameter to check; trainable parameters are "
            f"{[n for n, _ in trainable][:10]}"
        )
    return chosen


class TorchChecker:
    """A reusable gradient check of one module (the callbacks keep one and call :meth:`check`).

    The float64 twin is built once and refreshed with the model's current values at each check.

    Args:
        model: Any ``torch.nn.Module`` (``torch.compile`` and DDP wrappers are unwrapped).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
        num_params: Coordinates per check (``coordinate`` mode).
        mode: ``"coordinate"`` or ``"directional"``.
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
        self.vectorize = v.check_optional_bool("vectorize", vectorize)
        #: Per-tensor choice of vmap or the loop, kept across checks.
        self.batching: dict[str, _Batching] = {}
        self.model = unwrap_module(model)
        self.loss_fn = loss_fn
        self.prepare = prepare
        named = _named_trainable(self.model, self.include, self.exclude)
        self.names = [n for n, _ in named]
        self.torch_dtype = self._target_dtype(named[0][1].dtype)
        self._twin: _Twin | None = None

    def _target_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        if self.dtype_name == "float64":
            return torch.float64
        if self.dtype_name == "float32":
            return torch.float32
        return model_dtype if model_dtype in _NP_DTYPES else torch.float32

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Checked tensor name → shape, in model order."""
        lookup = dict(_named_trainable(self.model, self.include, self.exclude))
        return {n: tuple(lookup[n].shape) for n in self.names}

    def twin(self) -> _Twin:
        """The (cached) module the checks compute on."""
        if self._twin is None:
            self._twin = _Twin(self.model, self.torch_dtype, self.prepare)
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

        Args:
            batch: Passed to ``loss_fn`` after its floating tensors are cast to the check dtype.
            step: Optimizer step recorded in the report.
            tensors: Indices into :attr:`names` to check (default all).
            sample_seed: Seed of this check's private generator (default ``seed``).
        """
        started = time.perf_counter()
        rng = np.random.default_rng(self.seed if sample_seed is None else sample_seed)
        eval_seed = int(rng.integers(2**62))
        twin = self.twin()
        notes = list(twin.notes)
        chosen = list(range(len(self.names))) if tensors is None else list(tensors)
        with _host_rng_preserved(), twin.synced() as module:
            lookup = dict(_named_trainable(module, self.include, self.exclude))
            params = [lookup[n] for n in self.names]
            device = params[0].device
            cast = cast_batch(batch, self.torch_dtype, device)
            evaluator = _Evaluator(
                module,
                self.names,
                params,
                cast,
                self.loss_fn,
                eval_seed,
                self.torch_dtype,
                batching=None if self.vectorize is False else self.batching,
                force_vmap=self.vectorize is True,
            )
            try:
                evaluator.compute_base()
                report = check_problem(
                    evaluator,
                    tensors=chosen,
                    num_params=self.num_params,
                    mode=self.mode,
                    rng=rng,
                    rtol=self.rtol,
                    eps=self.eps,
                    step=step,
                    notes=notes,
                    started=started,
                    hint="check that loss_fn runs the model",
                )
            finally:
                evaluator.restore_buffers()
        return report


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
) -> CheckReport:
    """Compare autodiff gradients of ``loss_fn(model, batch)`` with central finite differences.

    Every trainable tensor is checked: ``num_params`` coordinates in all, bigger tensors getting
    more and every tensor at least one (``mode="coordinate"``), or one random unit direction per
    tensor (``mode="directional"``). The model is never changed.

    Args:
        model: Any ``torch.nn.Module``.
        batch: A tensor, tuple, list, dict or nested mix; floating tensors are cast to the check
            dtype, integer tensors (token ids, labels) are not.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        num_params: Coordinates in all (at least one per tensor).
        mode: ``"coordinate"`` or ``"directional"``.
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
    )
    return checker.check(batch)


def assert_gradients(model: nn.Module, batch: Any, loss_fn: LossFn, **kwargs: Any) -> CheckReport:
    """Like :func:`check_gradients`, but raise :class:`~gradwatch.GradientCheckError` on ``fail``.

    Meant for a user's own unit tests of custom layers.

    Example:
        >>> import torch
        >>> assert_gradients(torch.nn.Linear(2, 1), torch.randn(3, 2),
        ...                  lambda m, x: m(x).sum()).verdict
        'pass'
    """
    report = check_gradients(model, batch, loss_fn, **kwargs)
    if report.verdict == "fail":
        raise GradientCheckError(f"gradient check failed\n{report}", report=report)
    return report
