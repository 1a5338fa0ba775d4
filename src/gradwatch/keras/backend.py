"""What differs between Keras' backends: autodiff, RNG, conversion to numpy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np

__all__ = ["floatx", "to_numpy", "torch_rng", "value_and_grad", "variable_norms"]


def to_numpy(x: Any) -> np.ndarray[Any, Any]:
    if isinstance(x, keras.Variable):
        x = x.value
    if hasattr(x, "read_value") and hasattr(x, "assign"):
        # A tf.Variable: numpy 2 warns when one is converted directly (its __array__ takes no
        # copy argument); read it as a tensor first.
        x = x.read_value()
    return np.asarray(keras.ops.convert_to_numpy(x))


#: The compiled weight-norm function of the latest variable list (TensorFlow).
_TF_NORMS: dict[tuple[int, ...], Any] = {}


def variable_norms(variables: list[Any]) -> np.ndarray[Any, Any]:
    """L2 norm of each variable, computed on its device and read to the host at once.

    Example:
        >>> variable_norms([keras.Variable(np.full((2, 2), 0.5, "float32"))]).tolist()
        [1.0]
    """
    if not variables:
        return np.zeros(0)
    backend = keras.backend.backend()
    values = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    if backend == "tensorflow":
        import tensorflow as tf

        key = tuple(id(x) for x in values)
        fn = _TF_NORMS.get(key)
        if fn is None:  # traced once per variable list: eager ops cost ~0.25 ms per variable
            _TF_NORMS.clear()
            fn = _TF_NORMS[key] = tf.function(
                lambda: tf.stack([tf.norm(tf.cast(x, tf.float32)) for x in values])
            )
        return np.asarray(fn().numpy(), dtype=np.float64)
    if backend == "torch":
        import torch

        from gradwatch.torch import _compat as torch_compat

        tensors = [x.detach().float() for x in values]
        device = tensors[0].device
        stacked = torch.stack([n.to(device) for n in torch_compat.foreach_norm(tensors)])
        return np.asarray(stacked.cpu().numpy(), dtype=np.float64)
    ops = keras.ops
    norms = ops.stack([ops.sqrt(ops.sum(ops.square(ops.cast(x, "float32")))) for x in values])
    return np.asarray(ops.convert_to_numpy(norms), dtype=np.float64)


def value_and_grad(
    fn: Callable[[list[Any]], Any], values: list[Any]
) -> tuple[float, list[np.ndarray[Any, Any] | None]]:
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            for t in values:
                tape.watch(t)
            loss = fn(values)
        grads = tape.gradient(loss, values, unconnected_gradients=tf.UnconnectedGradients.NONE)
        out: list[np.ndarray[Any, Any] | None] = []
        for g in grads:
            if g is None:
                out.append(None)
            else:
                if isinstance(g, tf.IndexedSlices):
                    g = tf.convert_to_tensor(g)  # sums duplicate indices
                out.append(g.numpy())
        return float(loss.numpy()), out
    if backend == "torch":
        import torch

        leaves = [t.detach().clone().requires_grad_(True) for t in values]
        loss = fn(leaves)
        if not loss.requires_grad:
            return float(loss.detach().cpu().item()), [None for _ in leaves]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return float(loss.detach().cpu().item()), [
            None if g is None else (g.to_dense() if g.is_sparse else g).detach().cpu().numpy()
            for g in grads
        ]
    if backend == "jax":
        import jax

        loss, grads = jax.value_and_grad(lambda vals: fn(list(vals)))(tuple(values))
        return float(loss), [np.asarray(g) for g in grads]
    raise ValueError(
        f"gradwatch.keras supports the tensorflow, torch and jax backends, not {backend!r}"
    )


@contextlib.contextmanager
def floatx(dtype: str) -> Iterator[None]:
    """``floatx`` set to ``dtype`` while the twin computes: some backend ops (the torch backend's
    cross-entropies) create intermediate tensors in floatx and would round the loss to float32."""
    saved = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(saved)


@contextlib.contextmanager
def torch_rng(seed: int) -> Iterator[None]:
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
