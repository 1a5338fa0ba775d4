"""Loss evaluations of the check engine's ``Problem`` on a torch module: deterministic, no trace.

Every evaluation is reseeded from a private seed inside ``torch.random.fork_rng``, buffers are
restored after it, a perturbed value is written back (not subtracted), and ``.grad`` is never
touched. Perturbations are evaluated one at a time here; :mod:`gradwatch.torch.vmap` batches them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from gradwatch.core.check import Perturbation
from gradwatch.torch import _compat
from gradwatch.torch.precision import Float64Guard
from gradwatch.torch.twin import clean_name, padding_rows

__all__ = ["Evaluator", "LossFn", "host_rng_preserved", "np_dtype"]

LossFn = Callable[[nn.Module, Any], Any]

NP_DTYPES: dict[torch.dtype, type[np.floating[Any]]] = {
    torch.float64: np.float64,
    torch.float32: np.float32,
}


def np_dtype(dtype: torch.dtype) -> type[np.floating[Any]]:
    return NP_DTYPES.get(dtype, np.float32)


@contextmanager
def host_rng_preserved() -> Iterator[None]:
    """Keep Python's and numpy's global RNG streams as they were (a loss_fn may draw from them)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


#: What torch raises when code registers a tensor hook while autograd is off.
_HOOK_WITHOUT_GRAD = "cannot register a hook on a tensor that doesn't require gradient"


class _GradMode(Protocol):
    with_grad: bool


def evaluation_grad_mode(owner: _GradMode) -> AbstractContextManager[Any]:
    """``torch.no_grad()`` for loss evaluations, unless ``owner`` learned that the step needs
    autograd on (it registers tensor hooks: ``Tensor.register_hook`` raises without it)."""
    return torch.enable_grad() if owner.with_grad else torch.no_grad()


def retrying_with_grad(owner: _GradMode, run: Callable[[], None]) -> None:
    """``run()``; if it fails because the step registers a tensor hook (Grad-CAM style code
    does) while autograd is off, switch ``owner`` to evaluating with autograd on, for good, and
    run again — a correct model must not crash or be skipped for it."""
    try:
        run()
    except RuntimeError as exc:
        if owner.with_grad or _HOOK_WITHOUT_GRAD not in str(exc):
            raise
        owner.with_grad = True
        run()


class Evaluator:
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
        *,
        draw_dtype: torch.dtype | None = None,
        float64_guard: bool = True,
        buffers: Sequence[torch.Tensor] | None = None,
    ) -> None:
        self.module = module
        self._names = names
        self.params = params
        self.batch = batch
        self.loss_fn = loss_fn
        self.seed = seed
        self.torch_dtype = dtype
        self.np_dtype = np.dtype(np_dtype(dtype))
        self.devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        kept = module.buffers() if buffers is None else buffers
        self.buffers = [(b, b.detach().clone()) for b in kept]
        self._base: float = float("nan")
        self._grads: list[torch.Tensor | None] = []
        self.evaluations = 0
        self._activation_bytes = 0
        #: Keeps float64 evaluations in float64 whatever the step creates or casts.
        self.guard = Float64Guard(draw_dtype) if float64_guard and dtype is torch.float64 else None
        self._computing_depth = 0
        self._padding: dict[str, npt.NDArray[np.bool_]] | None = None
        #: Evaluate losses with autograd on (the step registers tensor hooks).
        self.with_grad = False

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

    @property
    def autodiff(self) -> list[torch.Tensor | None]:
        """The autodiff gradient of each tensor at the base point (after :meth:`compute_base`)."""
        return list(self._grads)

    def values(self, tensor: int) -> npt.NDArray[np.floating[Any]]:
        return self.params[tensor].detach().cpu().numpy().copy()

    def gradient(self, tensor: int) -> npt.NDArray[np.floating[Any]] | None:
        g = self._grads[tensor]
        return None if g is None else g.cpu().numpy()

    def excluded(self, tensor: int) -> npt.NDArray[np.bool_] | None:
        """An embedding's ``padding_idx`` row (torch defines its gradient as zero), by name:
        the tensors may be float64 stand-ins for the module's own parameters."""
        if self._padding is None:
            rows = padding_rows(self.module)
            self._padding = {
                clean_name(n): rows[id(p)]
                for n, p in self.module.named_parameters()
                if id(p) in rows
            }
        return self._padding.get(self._names[tensor]) if self._names else None

    def losses(self, perturbations: Sequence[Perturbation]) -> npt.NDArray[np.float64]:
        out = np.empty(len(perturbations), dtype=np.float64)
        groups: dict[int, list[int]] = {}
        for k, pert in enumerate(perturbations):
            groups.setdefault(pert.tensor, []).append(k)

        def run() -> None:
            with evaluation_grad_mode(self):
                for tensor, ks in groups.items():
                    out[ks] = self._group_losses(tensor, [perturbations[k] for k in ks])

        retrying_with_grad(self, run)
        return out

    # -- one tensor's perturbations: the loop or vmap ------------------------------------------

    def _group_losses(self, tensor: int, perts: list[Perturbation]) -> npt.NDArray[np.float64]:
        """Losses of one tensor's perturbations (the loop; the batched evaluator overrides it)."""
        return self._loop(perts)

    def _loop(self, perturbations: Sequence[Perturbation]) -> npt.NDArray[np.float64]:
        out = np.empty(len(perturbations), dtype=np.float64)
        for k, pert in enumerate(perturbations):
            p = self.params[pert.tensor]
            value = torch.as_tensor(np.asarray(pert.value), dtype=p.dtype, device=p.device)
            # Writes without autograd even when the evaluation runs with it (``with_grad``).
            if pert.index is None:
                saved = p.detach().clone()
                with torch.no_grad():
                    p.copy_(value)
                try:
                    out[k] = self._loss_value(self._call())
                finally:
                    with torch.no_grad():
                        p.copy_(saved)
            else:
                saved = p[pert.index].detach().clone()
                with torch.no_grad():
                    p[pert.index] = value
                try:
                    out[k] = self._loss_value(self._call())
                finally:
                    with torch.no_grad():
                        p[pert.index] = saved
        return out

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Where evaluations run: under the float64 guard, ``torch.compile``d code run eagerly.

        Re-entrant; everything global it changes is put back on exit.
        """
        if self._computing_depth:
            yield
            return
        self._computing_depth += 1
        try:
            with _compat.compiled_code_run_eagerly():
                if self.guard is None:
                    yield
                else:
                    with self.guard:
                        yield
        finally:
            self._computing_depth -= 1

    @contextmanager
    def _seed(self) -> Iterator[None]:
        """The evaluation seed on every generator in use; the caller's RNG streams untouched."""
        with torch.random.fork_rng(devices=self.devices), self.computing():
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
            with (
                self.computing(),
                torch.enable_grad(),
                torch.autograd.graph.saved_tensors_hooks(pack, _unpack),
            ):
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


def _finite(evaluator: Evaluator) -> bool:
    """Whether the base loss and every autodiff gradient of ``evaluator`` are finite."""
    if not np.isfinite(evaluator.base_loss):
        return False
    return all(bool(torch.isfinite(g).all()) for g in evaluator.autodiff if g is not None)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
