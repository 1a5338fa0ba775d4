"""``localize`` for Keras 3 models: which layer's own backward is wrong (TensorFlow, torch, JAX).

One forward/backward of the model itself in float64 (:class:`~gradwatch.keras.twin.Float64Evaluation`,
inside a ``StatelessScope``) records every layer call: each selected layer's ``call`` is wrapped for
the duration (an instance attribute, removed in ``finally``) to keep its inputs and non-trainable
state and to obtain the cotangent of its outputs — on TensorFlow by watching the outputs on a
``tf.GradientTape`` (one ``tape.gradient`` gives every cotangent and tells which inputs carried a
gradient; also at a softmax/sigmoid output's ``_keras_logits``, which TensorFlow's crossentropy
losses read instead of the output: :func:`~gradwatch.keras.local_check.keras_logits`), on torch and JAX by differentiating the loss with respect to a zero tensor added to
each output (:mod:`gradwatch.keras.local_backends`, which says why). Each call is then checked
alone (:class:`~gradwatch.keras.local_check.LayerProblem`) by the check engine, and the culprit is
the innermost failing layer, exactly as on the torch side (:func:`gradwatch.localization.culprits`).

When the float64 values of the model's weights would exceed ``max_check_memory`` (default: the free
memory of the model's device), the recording pass runs in the model's own dtype on its own
weights, and each layer is checked with float64 values of its own weights only (inputs, state and
cotangents cast to float64); a layer too large for that alone is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras

from gradwatch import options as v
from gradwatch.core.local import check_local
from gradwatch.keras import _compat
from gradwatch.keras.backend import torch_rng
from gradwatch.keras.checker import KerasChecker
from gradwatch.keras.local_backends import (
    CallRecorder,
    float64_bytes,
    low_precision,
    memory_limit,
    precision,
    record_calls,
    suspect_notes,
)
from gradwatch.keras.problem import _cast_tree, _pack, _value_in
from gradwatch.localization import ROOT, LocalizationReport, ModuleResult, module_result
from gradwatch.report import CheckReport

if TYPE_CHECKING:
    from gradwatch.keras.local_check import LayerCall

__all__ = ["KerasLocalizer", "layer_tree", "localize"]


def layer_tree(model: Any) -> list[tuple[str, Any]]:
    """``(name, layer)`` for the model and every layer inside it, parents before children.

    Names are dotted paths of layer names below the model (``block.act``); the model itself is
    ``<model>``; a layer reachable twice keeps its first name.

    Example:
        >>> inner = keras.Sequential([keras.layers.Dense(2, name="d")], name="block")
        >>> model = keras.Sequential([keras.Input((3,)), inner])
        >>> [n for n, _ in layer_tree(model)]
        ['<model>', 'block', 'block.d']
    """
    out: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def visit(name: str, layer: Any) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        out.append((name, layer))
        functional = getattr(layer, "_functional", None)  # Sequential's internal graph
        for child in _children(layer):
            if child is functional or isinstance(child, keras.layers.InputLayer):
                continue
            visit(child.name if name == ROOT else f"{name}.{child.name}", child)

    visit(ROOT, model)
    return out


def _children(layer: Any) -> list[Any]:
    return list(layer._flatten_layers(include_self=False, recursive=False))


_NEVER_CALLED = (
    "never called as a layer (its weights are checked inside the check of the layer that uses them)"
)


_SUPPORTED = ("tensorflow", "torch", "jax")


class KerasLocalizer:
    """A reusable localization of one Keras model (the callback keeps one).

    Args:
        model: A built, compiled Keras 3 model (or any model with ``loss=``).
        loss: Anything ``model.compile(loss=...)`` accepts; default the compiled loss.
        loss_fn: ``loss_fn(model, data) -> scalar`` localized instead of a loss (as
            :class:`~gradwatch.keras.checker.KerasChecker` takes it).
        seed: Seed of the random directions (and of torch's RNG in the recording pass).
        include: Regular expression(s) on layer names (``block.act``): check only these.
        exclude: Regular expression(s) on layer names: skip these.
        max_check_memory: Bytes the float64 values of the weights may take (``None``: the free
            memory of the model's device, :func:`~gradwatch.keras.local_backends.free_memory`;
            no limit where it cannot be read). Over it the model is checked layer by layer.
        rtol: Tolerance of each layer's check (``None``: the float64 default).
        eps: Base finite-difference step (``None``: the default).
    """

    def __init__(
        self,
        model: Any,
        *,
        loss: Any = None,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        max_check_memory: int | None = None,
        rtol: float | None = None,
        eps: float | None = None,
    ) -> None:
        self.seed = self._seed = v.check_seed(seed)
        self.rtol = v.check_positive_float("rtol", rtol, allow_none=True)
        self.eps = v.check_positive_float("eps", eps, allow_none=True)
        self.include = v.compile_patterns("include", include)
        self.exclude = v.compile_patterns("exclude", exclude)
        self.max_check_memory = v.check_positive_int(
            "max_check_memory", max_check_memory, allow_none=True
        )
        self.model = model
        self.loss = loss
        self.loss_fn = loss_fn
        self.backend = keras.backend.backend()
        self.checker: KerasChecker | None = None
        self.precision: str = "float64"
        self.notes: list[str] = []
        if self.backend in _SUPPORTED:
            self.precision, self.notes = precision()
            self.checker = self._checker(self.precision)
        self._own_checker: KerasChecker | None = None

    def _checker(self, dtype: str | None) -> KerasChecker:
        return KerasChecker(
            self.model, loss=self.loss, loss_fn=self.loss_fn, seed=self.seed, dtype=dtype
        )

    def memory_limit(self) -> int | None:
        """Bytes the float64 values of the weights may take: ``max_check_memory``, else the free
        memory of the model's device; ``None``: no limit."""
        return memory_limit(self.model, self.max_check_memory)

    def localize(
        self,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        data: Any = None,
        seed: int | None = None,
    ) -> LocalizationReport:
        """Check every layer call on ``(x, y, sample_weight)`` (with ``loss_fn``: on ``data``
        as ``train_step`` receives it, default the three packed); the model is left as it was.
        ``seed`` replaces the constructor's seed of the directions for this call."""
        started = time.perf_counter()
        self._seed = self.seed if seed is None else v.check_seed(seed)
        if self.checker is None:
            why = (
                f"localize is unsupported on the {self.backend} backend "
                f"(TensorFlow, torch and JAX only)"
            )
            return LocalizationReport(None, (), (), ((ROOT, why),), notes=(why,))
        if self.loss_fn is not None:
            raw = data if data is not None else _pack(x, y, sample_weight)
        else:
            raw = (x, y, sample_weight)
        tree = layer_tree(self.model)
        selected = [(n, layer) for n, layer in tree if v.selected(n, self.include, self.exclude)]
        limit = self.memory_limit()
        need = float64_bytes(self.model.weights)
        notes = list(self.notes)
        if limit is not None and need > limit:
            if self._own_checker is None:
                self._own_checker = self._checker(None)
            checker = self._own_checker
            values = [_current(w) for w in checker.trainable_sources]
            frozen = [_current(w) for w in checker.frozen_vars]
            batch = _cast_tree(raw, checker.dtype_name)
            base = None
            over = (
                f"max_check_memory={limit}"
                if self.max_check_memory is not None
                else f"the {limit} bytes of free memory the model's device reports"
            )
            notes.append(
                f"the float64 values of the model's weights would take {need} bytes, over {over}, "
                f"so it was checked layer by layer: calls recorded in {checker.dtype_name}, each "
                f"layer checked with {self.precision} values of its own weights, inputs and "
                f"cotangents"
            )
        else:
            checker, dtype = self.checker, self.precision
            values = [_value_in(w, dtype) for w in checker.trainable_sources]
            frozen = [_value_in(w, dtype) for w in checker.frozen_vars]
            base = list(zip(checker.trainable_sources, values, strict=True))
            base += list(zip(checker.frozen_vars, frozen, strict=True))
            batch = _cast_tree(raw, dtype)
            limit = None
        calls = self._record(checker, selected, values, frozen, batch)
        results, skipped, evaluations = self._check_calls(selected, calls, base, limit)
        inside = _containment(selected)
        notes += suspect_notes(results, inside, self.precision)
        return LocalizationReport.from_results(
            results,
            skipped,
            inside,
            evaluations=evaluations,
            started=started,
            notes=notes,
        )

    def _record(
        self,
        checker: KerasChecker,
        selected: list[tuple[str, Any]],
        values: list[Any],
        frozen: list[Any],
        batch: Any,
    ) -> list[LayerCall]:
        """One forward/backward with every selected layer's calls recorded."""
        if self.backend != "tensorflow":
            return record_calls(
                selected,
                lambda vals: checker._loss_eager(vals, frozen, batch),
                values,
                lambda: torch_rng(self.seed),
            )
        import tensorflow as tf

        from gradwatch.keras.local_check import is_float_tensor, keras_logits

        def watch(call: LayerCall, out: Any) -> Any:
            for t in call.outputs:
                tape.watch(t)
                if keras_logits(t) is not None:  # see below
                    tape.watch(keras_logits(t))
            return out

        with tf.GradientTape() as tape:
            for t in values:
                tape.watch(t)
            recorder = CallRecorder(selected, watch)
            try:
                loss = checker._loss_eager(values, frozen, batch)
            finally:
                recorder.close()
        calls = recorder.calls
        inputs = [[x for x in c.leaves if is_float_tensor(x)] for c in calls]
        # A softmax/sigmoid output's crossentropy is computed from the logits Keras attached to it
        # (`keras_logits`), so the output gets no cotangent: take the logits' too (after the rest).
        logits = [[_own_logits(t, c.outputs) for t in c.outputs] for c in calls]
        sources = [t for c in calls for t in c.outputs] + [x for xs in inputs for x in xs]
        sources += [t for ts in logits for t in ts if t is not None]
        grads = tape.gradient(loss, sources) if sources else []
        it = iter(grads)
        for c in calls:
            c.cotangents = [_dense(next(it)) for _ in c.outputs]
        for c, xs in zip(calls, inputs, strict=True):
            flags = iter([next(it) is not None for _ in xs])
            c.needs_grad = [is_float_tensor(x) and next(flags) for x in c.leaves]
        for c, ts in zip(calls, logits, strict=True):
            got = [None if t is None else _dense(next(it)) for t in ts]
            # Kept only where the output itself got none: otherwise the tape's gradient at the
            # logits already includes the path through the output and would count it twice.
            c.logit_cotangents = [
                g if cot is None else None for g, cot in zip(got, c.cotangents, strict=True)
            ]
        return calls

    def _check_calls(
        self,
        selected: list[tuple[str, Any]],
        calls: list[LayerCall],
        base: list[tuple[Any, Any]] | None,
        limit: int | None,
    ) -> tuple[list[ModuleResult], list[tuple[str, str]], int]:
        """Each selected layer's calls checked alone (``base`` ``None``: layer by layer, each
        with float64 values of its own weights, if they fit in ``limit``)."""
        by_layer: dict[int, list[LayerCall]] = {}
        for call in calls:
            by_layer.setdefault(id(call.layer), []).append(call)
        results: list[ModuleResult] = []
        skipped: list[tuple[str, str]] = []
        evaluations = 0
        for index, (name, layer) in enumerate(selected):
            mine = by_layer.get(id(layer), [])
            own, inner = _weights(layer)
            if not mine:
                if own:
                    skipped.append((name, _NEVER_CALLED))
                continue
            if limit is not None and float64_bytes(layer.weights) > limit:
                size = float64_bytes(layer.weights)
                skipped.append((name, f"too large to check alone ({size} bytes in float64)"))
                continue
            reports: list[CheckReport] = []
            reasons: list[str] = []
            for k, call in enumerate(mine):
                if not any(c is not None for c in (*call.cotangents, *call.logit_cotangents)):
                    if call.outputs:
                        reasons.append("its output does not reach the loss")
                    continue
                report, reason, used = self._check_call(call, own, inner, base, (index, k))
                evaluations += used
                if report is not None:
                    reports.append(report)
                elif reason:
                    reasons.append(reason)
            if reports:
                result = module_result(name, type(layer).__name__, reports)
                results.append(low_precision(result, self.precision))
            elif reasons:
                skipped.append((name, reasons[0]))
        return results, skipped, evaluations

    def _check_call(
        self,
        call: LayerCall,
        own: list[tuple[str, Any]],
        inner: list[Any],
        base: list[tuple[Any, Any]] | None,
        where: tuple[int, int],
    ) -> tuple[CheckReport | None, str, int]:
        """One call checked alone; a failure to set it up is a reason, never an exception."""
        from gradwatch.keras.local_check import LayerProblem

        assert self.checker is not None
        try:
            if base is None:  # layer by layer: only this layer's weights, in the check dtype
                base = [(w, _value_in(w, self.precision)) for _, w in own]
                base += [(w, _value_in(w, self.precision)) for w in inner]
            problem = LayerProblem(
                call, own, inner, base, self.checker.evaluation.active, self.precision
            )
        except Exception as exc:
            return None, f"it could not be set up alone ({type(exc).__name__}: {exc})", 0
        return check_local(problem, (self._seed, *where), "keras", rtol=self.rtol, eps=self.eps)


def _current(variable: Any) -> Any:
    """A variable's value as it is (no copy, no cast): the recording pass in the model's dtype."""
    return keras.ops.convert_to_tensor(variable.value)


def _own_logits(t: Any, outputs: list[Any]) -> Any:
    """``t``'s Keras logits, unless they are themselves one of the call's outputs (a layer that
    returns both): that output's cotangent already is theirs."""
    from gradwatch.keras.local_check import keras_logits

    logits = keras_logits(t)
    return None if logits is None or any(logits is o for o in outputs) else logits


def _dense(grad: Any) -> Any:
    if grad is None:
        return None
    import tensorflow as tf

    return tf.convert_to_tensor(grad)


def _weights(layer: Any) -> tuple[list[tuple[str, Any]], list[Any]]:
    """The layer's own trainable float weights ``(name, variable)`` and its sublayers'."""
    floats = [w for w in layer.trainable_variables if "float" in str(w.dtype)]
    nested = {id(w) for sub in _compat.layers_of(layer)[1:] for w in sub.trainable_variables}
    own = [(w.name, w) for w in floats if id(w) not in nested]
    inner = [w for w in floats if id(w) in nested]
    return own, inner


def _containment(selected: list[tuple[str, Any]]) -> dict[str, set[str]]:
    """Layer name → the names of the selected layers inside it (shared layers included)."""
    names = {id(layer): n for n, layer in selected}
    return {
        n: {names[id(sub)] for sub in _compat.layers_of(layer)[1:] if id(sub) in names}
        for n, layer in selected
    }


def localize(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    sample_weight: Any = None,
    loss: Any = None,
    seed: int = 0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    max_check_memory: int | None = None,
) -> LocalizationReport:
    """Find the Keras layer whose own backward is wrong (TensorFlow, torch and JAX backends).

    In one float64 forward/backward of ``model`` on ``(x, y)``, every layer call's inputs and
    output cotangent are recorded; each call is then checked alone: the scalar
    ``<cotangent, layer(inputs; its weights)>`` differentiated by the backend's autodiff along
    random directions against central finite differences, in training mode with the recorded
    dropout seed state. Layers of functional, sequential and subclassed models are covered, nested
    ones too; parameter-free layers and custom-gradient code (``tf.custom_gradient``,
    ``torch.autograd.Function``, ``jax.custom_vjp``) included. The model is never changed. On JAX
    without ``JAX_ENABLE_X64=1`` everything is float32 and the report's notes say so.

    Args:
        model: A built Keras 3 model, compiled or with ``loss=``.
        x: Inputs.
        y: Targets.
        sample_weight: Optional sample weights.
        loss: Anything ``model.compile(loss=...)`` accepts (default: the compiled loss).
        seed: Seed of the random directions.
        include: Regular expression(s) on layer names (``block.act``): check only these.
        exclude: Regular expression(s) on layer names: skip these.
        max_check_memory: Bytes the float64 values of the weights may take (``None``: the free
            memory of the model's device; no limit on a TensorFlow GPU, which reports none). Over
            it, calls are recorded in the model's dtype and each layer is checked with float64
            values of its own weights; a layer too large alone is in ``skipped``.

    Returns:
        A :class:`~gradwatch.LocalizationReport`; ``str(report)`` is a tree with the culprit
        marked.

    Example:
        >>> import numpy as np, tensorflow as tf
        >>> @tf.custom_gradient
        ... def halved(x):
        ...     return tf.identity(x), lambda g: 0.5 * g   # wrong: the identity's slope is 1
        >>> class Halved(keras.layers.Layer):
        ...     def call(self, x):
        ...         return halved(x)
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           Halved(name="act"), keras.layers.Dense(1)])
        >>> model.compile(loss="mse")
        >>> x, y = np.ones((8, 3), "float32"), np.zeros((8, 1), "float32")
        >>> localize(model, x, y).culprit
        'act'
    """
    return KerasLocalizer(
        model,
        loss=loss,
        seed=seed,
        include=include,
        exclude=exclude,
        max_check_memory=max_check_memory,
    ).localize(x, y, sample_weight)
