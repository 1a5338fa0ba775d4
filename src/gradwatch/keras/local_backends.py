"""What differs between Keras' backends in a localization: recording the calls, the precision, the
free memory.

**Recording.** Every selected layer's ``call`` is wrapped for the duration of a pass
(:class:`CallRecorder`, an instance attribute removed in ``finally``). On TensorFlow one pass under
a ``GradientTape`` watches every output (:mod:`gradwatch.keras.localize`). On the torch and JAX
backends (:func:`record_calls`) the same two passes serve both:

1. a plain forward keeps each call's inputs, the layer's non-trainable state at the call (and, on
   torch, the RNG state Keras' unseeded dropout draws from) and the shape of each floating output;
2. a forward/backward in which the wrapper adds a zero tensor ``δ`` to each floating output of
   each call: ``∂loss/∂δ`` is exactly the cotangent that output received, and one
   :func:`~gradwatch.keras.backend.value_and_grad` over the weights and every ``δ`` gives them
   all — ``torch.autograd.grad`` on torch, ``jax.value_and_grad`` on JAX.

Why ``δ`` rather than hooks: JAX has no hooks and no tape, and a function of the ``δ`` is the one
form both backends differentiate alike; on torch it also avoids gradients taken at non-leaf
tensors that a later in-place operation may have changed. Whether an input carried a gradient is
read in pass 2: on torch ``requires_grad``, on JAX whether it is a tracer of the differentiation
(the model's inputs and integer ids are neither). Both passes run with the same values in a fresh
``StatelessScope`` and, on torch, the same seed, so they make the same calls and draw the same
dropout masks; a pass whose calls differ from the first is reported, not guessed at. Pass 2 costs
one more forward than a tape would: on small models nothing next to the local checks.

**Precision.** JAX computes in float64 only with ``JAX_ENABLE_X64=1``; without it the calls are
recorded and checked in float32 and the report says so (:func:`precision`); a float32 ``pass`` with
an error above float32 noise is made ``inconclusive`` (:func:`low_precision`), never ``fail``.

**Memory.** :func:`free_memory` is what the device the model lives on reports: CPU ``MemAvailable``
(:func:`gradwatch.core.memory.available_ram`), CUDA under torch ``torch.cuda.mem_get_info``, a JAX
accelerator ``bytes_limit - bytes_in_use`` of its ``memory_stats()``. TensorFlow GPUs report no free
memory (``tf.config.experimental.get_memory_info`` gives the bytes TensorFlow uses, current and peak,
not what is left — and TensorFlow reserves the whole GPU by default): there no limit is applied
unless ``max_check_memory`` is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from gradwatch.core.memory import available_ram
from gradwatch.keras.backend import value_and_grad
from gradwatch.keras.local_check import LayerCall, float_outputs, is_float_tensor
from gradwatch.localization import ModuleResult, culprits

__all__ = [
    "CallRecorder",
    "carries_gradient",
    "float64_bytes",
    "free_memory",
    "low_precision",
    "memory_limit",
    "precision",
    "record_calls",
    "suspect_notes",
]

_ABSENT = object()


class CallRecorder:
    """Wraps each layer's ``call`` while installed (``close`` puts every one back).

    Args:
        layers: ``(name, layer)`` to record.
        after: ``after(call, output) -> output``: sees each finished call (its ``outputs`` set)
            and returns what the layer returns.
    """

    def __init__(
        self, layers: Sequence[tuple[str, Any]], after: Callable[[LayerCall, Any], Any]
    ) -> None:
        self.calls: list[LayerCall] = []
        self.position: dict[int, int] = {}  # id(call) -> its index in `calls` (start order)
        self._after = after
        self._saved: list[tuple[Any, Any]] = []
        self._torch = keras.backend.backend() == "torch"
        try:
            for name, layer in layers:
                own = layer.__dict__.get("call", _ABSENT)
                object.__setattr__(layer, "call", self._wrap(name, layer, layer.call))
                self._saved.append((layer, own))
        except BaseException:
            self.close()
            raise

    def _wrap(self, name: str, layer: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            state = [(w, w.value) for w in layer.non_trainable_variables]
            record = LayerCall(name, layer, tuple(args), dict(kwargs), state)
            if self._torch:
                import torch

                record.rng = torch.get_rng_state()
            self.position[id(record)] = len(self.calls)
            self.calls.append(record)
            out = original(*args, **kwargs)
            record.outputs = float_outputs(out)
            return self._after(record, out)

        return call

    def close(self) -> None:
        for layer, own in reversed(self._saved):
            if own is _ABSENT:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", own)
        self._saved = []


def carries_gradient(x: Any) -> bool:
    """Whether ``x``, met inside a differentiation on the torch or JAX backend, depends on what
    is differentiated (torch: ``requires_grad``; JAX: a tracer)."""
    if not is_float_tensor(x):
        return False
    if keras.backend.backend() == "torch":
        return bool(x.requires_grad)
    import jax

    return isinstance(x, jax.core.Tracer)


def _detached(x: Any) -> Any:
    return x.detach() if hasattr(x, "detach") and hasattr(x, "requires_grad") else x


def record_calls(
    selected: Sequence[tuple[str, Any]],
    loss: Callable[[list[Any]], Any],
    values: list[Any],
    rng: Callable[[], Any],
) -> list[LayerCall]:
    """Every selected layer's calls with inputs, state and cotangents (torch and JAX backends).

    Args:
        selected: ``(name, layer)`` to record.
        loss: ``loss(values)``: the model's loss at the weights ``values``, in its evaluation.
        values: The trainable weights' values.
        rng: A fresh context holding torch's RNG at one seed (a no-op elsewhere).

    Raises:
        RuntimeError: The differentiating pass made other calls than the plain one.
    """
    recorder = CallRecorder(selected, lambda call, out: out)
    try:
        with rng():
            loss([_detached(v) for v in values])
    finally:
        recorder.close()
    calls = recorder.calls
    for c in calls:
        c.args, c.kwargs = keras.tree.map_structure(_detached, (c.args, c.kwargs))
        c.state = [(w, _detached(x)) for w, x in c.state]
    deltas = [[keras.ops.zeros_like(t) for t in c.outputs] for c in calls]
    flat = [d for ds in deltas for d in ds]
    n = len(values)
    current: list[Any] = []

    def add_delta(call: LayerCall, out: Any) -> Any:
        k = second.position[id(call)]
        if k >= len(calls) or calls[k].layer is not call.layer:
            raise RuntimeError(
                f"the layer calls differ between two identical passes at {call.name}"
            )
        calls[k].needs_grad = [carries_gradient(x) for x in call.leaves]
        mine = iter(current[k])
        return keras.tree.map_structure(lambda t: t + next(mine) if is_float_tensor(t) else t, out)

    def differentiated(leaves: list[Any]) -> Any:
        current[:] = _split(leaves[n:], deltas)
        return loss(leaves[:n])

    second = CallRecorder(selected, add_delta)
    try:
        with rng():
            _, grads = value_and_grad(differentiated, list(values) + flat)
    finally:
        second.close()
    if len(second.calls) != len(calls):
        raise RuntimeError("the layer calls differ between two identical passes")
    cotangents = iter(grads[n:])
    for c in calls:
        c.cotangents = [_cotangent(next(cotangents)) for _ in c.outputs]
        c.outputs = [_detached(t) for t in c.outputs]
    return calls


def _split(flat: Sequence[Any], like: Sequence[Sequence[Any]]) -> list[list[Any]]:
    out, k = [], 0
    for group in like:
        out.append(list(flat[k : k + len(group)]))
        k += len(group)
    return out


def _cotangent(grad: Any) -> Any:
    """A cotangent as a backend tensor; ``None`` when it is missing or exactly zero (the output
    does not reach the loss: JAX gives zeros where torch gives ``None``)."""
    if grad is None:
        return None
    arr = np.asarray(grad)
    if not np.any(arr):
        return None
    return keras.ops.convert_to_tensor(arr)


def precision() -> tuple[str, list[str]]:
    """The precision a localization computes in on this backend, and the note to say about it.

    Example:
        >>> precision()[0] in ("float64", "float32")
        True
    """
    backend = keras.backend.backend()
    if backend != "jax":
        return "float64", []
    import jax

    if jax.dtypes.canonicalize_dtype(np.float64) == np.float64:  # JAX_ENABLE_X64 (no warning)
        return "float64", []
    note = (
        f"the loss came out in float32 on the {backend} backend"
        + (" (JAX computes in float32 unless JAX_ENABLE_X64=1)" if backend == "jax" else "")
        + ", so this localization has float32 resolution: only gross bugs are visible"
    )
    return "float32", [note]


def float64_bytes(variables: Sequence[Any]) -> int:
    """Bytes the float64 values of the floating variables among ``variables`` take.

    Example:
        >>> layer = keras.layers.Dense(2); layer.build((None, 3))
        >>> float64_bytes(layer.weights)   # 6 kernel entries + 2 biases
        64
    """
    return sum(int(np.prod(w.shape)) * 8 for w in variables if "float" in str(w.dtype))


def memory_limit(model: Any, max_check_memory: int | None) -> int | None:
    """Bytes float64 values of the weights may take: ``max_check_memory``, else the free memory
    of the model's device (:func:`free_memory`); ``None``: no limit."""
    return max_check_memory if max_check_memory is not None else free_memory(model)


def free_memory(model: Any) -> int | None:
    """Bytes free on the device the model's weights live on (``None``: unknown, no limit).

    See the module docstring for what each backend and device can report.
    """
    weights = list(model.weights)
    if not weights:
        return available_ram()
    value = weights[0].value
    backend = keras.backend.backend()
    try:
        if backend == "torch":
            import torch

            device = value.device
            if device.type == "cuda":
                return int(torch.cuda.mem_get_info(device)[0])
            return available_ram() if device.type == "cpu" else None
        if backend == "jax":
            device = next(iter(value.devices()))
            if device.platform == "cpu":
                return available_ram()
            stats = device.memory_stats() or {}
            if "bytes_limit" in stats:
                return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
            return None
        device_name = str(getattr(value, "device", "") or "")
        if "GPU" in device_name.upper() or "TPU" in device_name.upper():
            return None  # TensorFlow reports what it uses, not what is free (module docstring)
        return available_ram()
    except Exception:  # a device that cannot say: no limit rather than a failure
        return None


#: Above this relative error a float32 local check is not called a pass (see low_precision).
FLOAT32_SUSPECT = 1e-2


def low_precision(result: ModuleResult, precision: str) -> ModuleResult:
    """A float32 ``pass`` whose error is above float32 noise made ``inconclusive``.

    In float32 the engine fails only errors above 40% (whole-model float32 checks reach 0.15-0.58
    on correct models), so a x0.9 backward passes. A local check of one layer is far less noisy:
    on the test models' correct layers (JAX without x64) the worst error was 2.2e-3, and a x0.9
    backward showed 0.1. An error between :data:`FLOAT32_SUSPECT` and the engine's tolerance is
    therefore not a pass, but not a proven failure either: ``inconclusive``, with the error in
    ``detail``, never a false ``fail``.
    """
    err = result.max_rel_error
    if precision == "float64" or result.verdict != "pass" or err is None or err <= FLOAT32_SUSPECT:
        return result
    return dataclasses.replace(
        result,
        verdict="inconclusive",
        detail=(
            f"its local check is off by {err:.0%} in {precision}: above float32 noise, below "
            f"what float32 can call a failure (set JAX_ENABLE_X64=1 to judge it)"
        ),
    )


def suspect_notes(
    results: Sequence[ModuleResult], inside: Mapping[str, Collection[str]], precision: str
) -> list[str]:
    """The note naming the layers :func:`low_precision` left undecided, innermost first."""
    suspects = [
        dataclasses.replace(m, verdict="fail")
        for m in results
        if m.verdict == "inconclusive" and m.detail.startswith("its local check is off")
    ]
    if not suspects:
        return []
    likely = ", ".join(culprits(suspects, inside))
    return [
        f"not judged in {precision}: the local checks of {', '.join(m.name for m in suspects)} "
        f"are off by more than {precision} noise ({FLOAT32_SUSPECT:g}) but less than a "
        f"{precision} failure; the innermost ({likely}) is the likely culprit — set "
        f"JAX_ENABLE_X64=1 to judge"
    ]
