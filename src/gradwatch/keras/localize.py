"""``localize`` for Keras 3 models: which layer's own backward is wrong (TensorFlow backend).

One float64 forward/backward of the model itself (:class:`~gradwatch.keras.twin.Float64Evaluation`,
inside a ``StatelessScope``, under a ``tf.GradientTape``) records every layer call: each selected
layer's ``call`` is wrapped for the duration (an instance attribute, removed in ``finally``) to keep
its inputs and non-trainable state and to watch its outputs on the tape; one ``tape.gradient``
then gives the cotangent of every output and tells which inputs carried a gradient. Each call is
then checked alone (:class:`~gradwatch.keras.local_check.LayerProblem`) by the check engine, and
the culprit is the innermost failing layer, exactly as on the torch side
(:func:`gradwatch.localization.culprits`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from gradwatch import options as v
from gradwatch.core.local import check_local
from gradwatch.keras import _compat
from gradwatch.keras.checker import KerasChecker, _cast_tree, _pack, _value_in
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


class _Recorder:
    """Wraps each layer's ``call`` while installed (``close`` puts every one back)."""

    def __init__(self, layers: Sequence[tuple[str, Any]], watch: Callable[[Any], None]) -> None:
        self.calls: list[LayerCall] = []
        self._watch = watch
        self._saved: list[tuple[Any, Any]] = []
        try:
            for name, layer in layers:
                own = layer.__dict__.get("call", _ABSENT)
                object.__setattr__(layer, "call", self._wrap(name, layer, layer.call))
                self._saved.append((layer, own))
        except BaseException:
            self.close()
            raise

    def _wrap(self, name: str, layer: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        from gradwatch.keras import local_check as lc

        def call(*args: Any, **kwargs: Any) -> Any:
            state = [(w, w.value) for w in layer.non_trainable_variables]
            record = lc.LayerCall(name, layer, tuple(args), dict(kwargs), state)
            self.calls.append(record)
            out = original(*args, **kwargs)
            record.outputs = lc.float_outputs(out)
            for t in record.outputs:
                self._watch(t)
            return out

        return call

    def close(self) -> None:
        for layer, own in reversed(self._saved):
            if own is _ABSENT:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", own)
        self._saved = []


_ABSENT = object()
_NEVER_CALLED = (
    "never called as a layer (its weights are checked inside the check of the layer that uses them)"
)


class KerasLocalizer:
    """A reusable localization of one Keras model (the callback keeps one).

    Args:
        model: A built, compiled Keras 3 model (or any model with ``loss=``).
        loss: Anything ``model.compile(loss=...)`` accepts; default the compiled loss.
        loss_fn: ``loss_fn(model, data) -> scalar`` localized instead of a loss (as
            :class:`~gradwatch.keras.checker.KerasChecker` takes it).
        seed: Seed of the random directions.
        include: Regular expression(s) on layer names (``block.act``): check only these.
        exclude: Regular expression(s) on layer names: skip these.
        max_check_memory: Bytes the check may use (``None``: no limit is applied on Keras).
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
        self.backend = keras.backend.backend()
        self.checker: KerasChecker | None = None
        if self.backend == "tensorflow":
            self.checker = KerasChecker(model, loss=loss, loss_fn=loss_fn, seed=seed)
        self.loss_fn = loss_fn

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
            why = f"localize is unsupported on the {self.backend} backend (TensorFlow only)"
            return LocalizationReport(None, (), (), ((ROOT, why),), notes=(why,))
        checker = self.checker
        dtype = "float64"
        values = [_value_in(w, dtype) for w in checker.trainable_sources]
        frozen = [_value_in(w, dtype) for w in checker.frozen_vars]
        base = list(zip(checker.trainable_sources, values, strict=True))
        base += list(zip(checker.frozen_vars, frozen, strict=True))
        if self.loss_fn is not None:
            raw = data if data is not None else _pack(x, y, sample_weight)
        else:
            raw = (x, y, sample_weight)
        batch = _cast_tree(raw, dtype)
        tree = layer_tree(self.model)
        selected = [(n, layer) for n, layer in tree if v.selected(n, self.include, self.exclude)]
        calls = self._record(selected, values, frozen, batch)
        results, skipped, evaluations = self._check_calls(selected, calls, base)
        return LocalizationReport.from_results(
            results,
            skipped,
            _containment(selected),
            evaluations=evaluations,
            started=started,
            notes=self._memory_notes(),
        )

    def _memory_notes(self) -> list[str]:
        if self.max_check_memory is None:
            return []
        need = sum(int(np.prod(w.shape)) * 8 for w in self.model.weights)
        if need <= self.max_check_memory:
            return []
        return [
            f"the float64 values of the weights take {need} bytes, over max_check_memory="
            f"{self.max_check_memory}; checking layer by layer is not implemented on Keras, so "
            f"the whole model was evaluated in float64"
        ]

    def _record(
        self, selected: list[tuple[str, Any]], values: list[Any], frozen: list[Any], batch: Any
    ) -> list[LayerCall]:
        """One float64 forward/backward with every selected layer's calls recorded."""
        import tensorflow as tf

        from gradwatch.keras.local_check import is_float_tensor

        checker = self.checker
        assert checker is not None
        with tf.GradientTape() as tape:
            for t in values:
                tape.watch(t)
            recorder = _Recorder(selected, tape.watch)
            try:
                loss = checker._loss_eager(values, frozen, batch)
            finally:
                recorder.close()
        calls = recorder.calls
        inputs = [[x for x in c.leaves if is_float_tensor(x)] for c in calls]
        sources = [t for c in calls for t in c.outputs] + [x for xs in inputs for x in xs]
        grads = tape.gradient(loss, sources) if sources else []
        it = iter(grads)
        for c in calls:
            c.cotangents = [_dense(next(it)) for _ in c.outputs]
        for c, xs in zip(calls, inputs, strict=True):
            flags = iter([next(it) is not None for _ in xs])
            c.needs_grad = [is_float_tensor(x) and next(flags) for x in c.leaves]
        return calls

    def _check_calls(
        self,
        selected: list[tuple[str, Any]],
        calls: list[LayerCall],
        base: list[tuple[Any, Any]],
    ) -> tuple[list[ModuleResult], list[tuple[str, str]], int]:
        from gradwatch.keras.local_check import LayerProblem

        by_layer: dict[int, list[LayerCall]] = {}
        for call in calls:
            by_layer.setdefault(id(call.layer), []).append(call)
        results: list[ModuleResult] = []
        skipped: list[tuple[str, str]] = []
        evaluations = 0
        assert self.checker is not None
        active = self.checker.evaluation.active
        for index, (name, layer) in enumerate(selected):
            mine = by_layer.get(id(layer), [])
            own, inner = _weights(layer)
            if not mine:
                if own:
                    skipped.append((name, _NEVER_CALLED))
                continue
            reports: list[CheckReport] = []
            reasons: list[str] = []
            for k, call in enumerate(mine):
                if not any(c is not None for c in call.cotangents):
                    if call.outputs:
                        reasons.append("its output does not reach the loss")
                    continue
                problem = LayerProblem(call, own, inner, base, active)
                report, reason, used = check_local(
                    problem, (self._seed, index, k), "keras", rtol=self.rtol, eps=self.eps
                )
                evaluations += used
                if report is not None:
                    reports.append(report)
                elif reason:
                    reasons.append(reason)
            if reports:
                results.append(module_result(name, type(layer).__name__, reports))
            elif reasons:
                skipped.append((name, reasons[0]))
        return results, skipped, evaluations


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
    """Find the Keras layer whose own backward is wrong (TensorFlow backend).

    In one float64 forward/backward of ``model`` on ``(x, y)``, every layer call's inputs and
    output cotangent are recorded; each call is then checked alone: the scalar
    ``<cotangent, layer(inputs; its weights)>`` differentiated by autodiff along random
    directions against central finite differences, in training mode with the recorded dropout
    seed state. Layers of functional, sequential and subclassed models are covered, nested ones
    too; parameter-free layers and ``tf.custom_gradient`` code included. The model is never
    changed. On the JAX and torch backends the report says the check is unsupported.

    Args:
        model: A built Keras 3 model, compiled or with ``loss=``.
        x: Inputs.
        y: Targets.
        sample_weight: Optional sample weights.
        loss: Anything ``model.compile(loss=...)`` accepts (default: the compiled loss).
        seed: Seed of the random directions.
        include: Regular expression(s) on layer names (``block.act``): check only these.
        exclude: Regular expression(s) on layer names: skip these.
        max_check_memory: Bytes the check may use; validated, and the report notes a model
            whose float64 weights exceed it (layer-by-layer checking is torch only).

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
