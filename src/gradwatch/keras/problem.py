"""The Keras model as the check engine's :class:`~gradwatch.core.problem.Problem`, and batch casting.

:class:`_Problem` evaluates a :class:`~gradwatch.keras.checker.KerasChecker`'s loss at perturbed
parameter values (through :meth:`~gradwatch.keras.checker.KerasChecker.loss_at`, every other
variable held at its value) and takes its gradients from the backend's autodiff. The helpers cast
variables' values and nested batches to the check dtype (integers stay as they are) and pack
``(x, y, sample_weight)`` as ``fit`` hands a batch to ``train_step``; ``keras/localize.py`` uses
them too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import numpy.typing as npt

from gradwatch.core.check import Perturbation
from gradwatch.keras.backend import to_numpy, torch_rng, value_and_grad

if TYPE_CHECKING:
    from gradwatch.keras.checker import KerasChecker


class _Problem:
    def __init__(
        self,
        checker: KerasChecker,
        batch: tuple[Any, ...],
        eval_seed: int,
    ) -> None:
        self.c = checker
        dtype = checker.dtype_name
        self._names = checker.names
        self._values = [
            np.asarray(to_numpy(w.value)).astype(dtype) for w in checker.trainable_sources
        ]
        self._shapes = [tuple(a.shape) for a in self._values]
        # The other variables' values, floats in the check dtype (seed states stay integers).
        self._frozen = [_value_in(w, dtype) for w in checker.frozen_vars]
        self.batch = _cast_tree(batch, dtype)
        self.eval_seed = eval_seed
        self.precision = dtype
        self.notes: list[str] = []
        probe = [keras.ops.convert_to_tensor(a, dtype=dtype) for a in self._values]
        with torch_rng(eval_seed):
            probe_out = self._loss(probe)
        probe_loss = float(to_numpy(probe_out))
        loss_dtype = str(keras.backend.standardize_dtype(probe_out.dtype))
        checker.loss_dtype = loss_dtype
        if dtype == "float64" and (
            loss_dtype != "float64"
            or (probe_loss != 0.0 and float(np.float32(probe_loss)) == probe_loss)
        ):
            # A float64 loss that is exactly a float32 number was rounded to float32 on the way
            # (JAX without jax_enable_x64 makes every array float32; the chance that a true
            # float64 value lands on the float32 grid is about 2**-29). Judge the check as a
            # float32 one rather than cry wolf.
            self.precision = "float32"
            self.notes.append(
                f"the loss came out in float32 on the {keras.backend.backend()} backend"
                + (
                    " (JAX computes in float32 unless JAX_ENABLE_X64=1)"
                    if keras.backend.backend() == "jax"
                    else ""
                )
                + ", so this check has float32 resolution: only gross bugs are visible"
            )
            self._values = [a.astype("float32").astype(dtype) for a in self._values]
        base_vals = [keras.ops.convert_to_tensor(a, dtype=dtype) for a in self._values]
        with torch_rng(eval_seed):
            self._base, self._grads = value_and_grad(self._loss, base_vals)
        self.evaluations = 1

    def _loss(self, values: Sequence[Any]) -> Any:
        return self.c.loss_at(list(values), self._frozen, self.batch)

    names = property(lambda self: self._names)
    shapes = property(lambda self: self._shapes)
    dtype = property(lambda self: np.dtype(self.precision))
    base_loss = property(lambda self: self._base)

    def values(self, tensor: int) -> npt.NDArray[Any]:
        return self._values[tensor].astype(self.precision)

    def gradient(self, tensor: int) -> npt.NDArray[Any] | None:
        return self._grads[tensor]

    def losses(self, perturbations: Sequence[Perturbation]) -> npt.NDArray[np.float64]:
        out = np.empty(len(perturbations), dtype=np.float64)
        dtype = self.c.dtype_name
        base = [keras.ops.convert_to_tensor(a, dtype=dtype) for a in self._values]
        for k, p in enumerate(perturbations):
            arr = self._values[p.tensor]
            if p.index is None:
                new = np.asarray(p.value, dtype=dtype)
            else:
                new = arr.copy()
                new[p.index] = p.value
            vals = list(base)
            vals[p.tensor] = keras.ops.convert_to_tensor(new, dtype=dtype)
            with torch_rng(self.eval_seed):
                out[k] = float(to_numpy(self._loss(vals)))
            self.evaluations += 1
        return out


def _value_in(variable: Any, dtype: str) -> Any:
    """A variable's current value as a tensor, floats cast to ``dtype`` (exactly: a widening)."""
    arr = np.asarray(to_numpy(variable.value))
    if np.issubdtype(arr.dtype, np.floating):
        return keras.ops.convert_to_tensor(arr.astype(dtype), dtype=dtype)
    return keras.ops.convert_to_tensor(arr, dtype=str(variable.dtype))


def _cast_tree(data: Any, dtype: str) -> Any:
    """Floating arrays/tensors in a nested structure → ``dtype``; integers stay as they are."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        return {k: _cast_tree(x, dtype) for k, x in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_cast_tree(x, dtype) for x in data)
    arr = to_numpy(data)
    if np.issubdtype(arr.dtype, np.floating):
        return keras.ops.convert_to_tensor(arr.astype(dtype), dtype=dtype)
    return keras.ops.convert_to_tensor(arr)


def _pack(x: Any, y: Any, sample_weight: Any) -> Any:
    """``(x, y, sample_weight)`` as ``fit`` hands a batch to ``train_step``."""
    if y is None and sample_weight is None:
        return (x,)
    if sample_weight is None:
        return (x, y)
    return (x, y, sample_weight)
