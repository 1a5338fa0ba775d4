"""``check_gradients`` / ``assert_gradients`` for Keras 3 models, and the reusable checker.

The check computes the model's loss at arbitrary parameter values without touching the model: the
model itself is evaluated in float64 (:class:`gradwatch.keras.twin.Float64Evaluation`: float64
policies, values and loss for one call, inside a ``keras.StatelessScope``) in training mode, with
every other variable (BatchNorm statistics, dropout seed state) held at its value so every
evaluation draws the same dropout mask, and whatever the evaluation assigns discarded. Gradients
come from the backend's own autodiff (:mod:`gradwatch.keras.backend`). The model as the engine's
``Problem``, and the casting of values and batches to the check dtype, are in
:mod:`gradwatch.keras.problem`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from gradwatch import options as v
from gradwatch.core.assertion import raise_unless_verified
from gradwatch.core.check import check_problem
from gradwatch.core.finite_diff import tolerances_for
from gradwatch.keras.problem import _pack, _Problem
from gradwatch.keras.twin import Float64Evaluation, compiled_loss, model_dtype
from gradwatch.localization import LocalizationReport, holder_patterns
from gradwatch.report import CheckReport

__all__ = [
    "KerasChecker",
    "assert_gradients",
    "check_gradients",
    "check_probe_shapes",
    "probe_batch",
]


class KerasChecker:
    """A reusable gradient check of one Keras model (the callback keeps one).

    Args:
        model: A built Keras 3 model.
        loss: Anything ``model.compile(loss=...)`` accepts; default the model's compiled loss.
        loss_fn: ``loss_fn(model, data) -> scalar`` checked instead of a loss, ``data`` as
            ``train_step`` receives it (for models with their own ``train_step``).
        num_params, mode, dtype, eps, rtol, seed, include, exclude, max_check_memory: as
            :func:`check_gradients`.
    """

    def __init__(
        self,
        model: Any,
        *,
        loss: Any = None,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        num_params: int = 32,
        mode: str = "coordinate",
        dtype: str | None = "float64",
        eps: float | None = None,
        rtol: float | None = None,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        max_check_memory: int | None = None,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, data), got {loss_fn!r}")
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
        self.num_params, self.mode, dt = o.num_params, o.mode, o.dtype
        self.max_check_memory = v.check_positive_int(
            "max_check_memory", max_check_memory, allow_none=True
        )
        #: The layer-by-layer check of ``mode="modules"`` (built at the first check).
        self._localizer: Any = None
        self._patterns = (include, exclude)
        self.eps, self.rtol, self.seed = o.eps, o.rtol, o.seed
        inc, exc = o.include, o.exclude
        if not model.built:
            raise ValueError("the model is not built: call it on data or build() it first")
        if loss is None and loss_fn is None:
            loss = compiled_loss(model)
            if loss is None:
                raise ValueError(
                    "the model has no loss: compile it (model.compile(loss=...)) or pass loss=..."
                )
        self.model = model
        self.loss = loss
        self.loss_fn = loss_fn
        trainable = [w for w in model.trainable_variables if "float" in str(w.dtype)]
        if not trainable:
            raise ValueError("the model has no trainable floating-point variables to check")
        if self.mode == "modules":  # the patterns select layers (by path) there
            from gradwatch.keras.localize import layer_tree

            v.check_selection([n for n, _ in layer_tree(model)], inc, exc, what="layer")
            inc, exc = [], []
        v.check_selection([w.path for w in trainable], inc, exc, what="variable")
        chosen = [i for i, w in enumerate(trainable) if v.selected(w.path, inc, exc)]
        own_dtype = model_dtype(model)
        self.dtype_name = {"float64": "float64", "float32": "float32", None: own_dtype}[dt]
        if self.dtype_name not in ("float64", "float32"):
            self.dtype_name = "float32"
        self.notes: list[str] = []
        self.evaluation = Float64Evaluation(model, None if loss_fn else loss, self.dtype_name)
        self.names = [trainable[i].path for i in chosen]
        self.trainable_sources = [trainable[i] for i in chosen]
        checked = {id(w) for w in self.trainable_sources}
        # Every other variable (frozen weights, BatchNorm statistics, seed state) is given its
        # current value too, so every evaluation sees the same state whatever it assigns.
        self.frozen_vars = [w for w in model.variables if id(w) not in checked]
        self.loss_dtype: str | None = None  # the dtype the loss came out in (after a check)
        self.traces = 0
        self._compiled: Any = None
        self._eager_done = False

    def _loss_eager(self, values: list[Any], frozen: list[Any], batch: Any) -> Any:
        self.traces += 1
        model = self.model
        mapping = list(zip(self.trainable_sources, values, strict=True))
        mapping += list(zip(self.frozen_vars, frozen, strict=True))
        with self.evaluation.active(mapping):
            if self.loss_fn is not None:
                loss = self.loss_fn(model, batch)
            else:
                x, y, sw = batch
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, training=True)
        return loss

    def loss_at(self, values: list[Any], frozen: list[Any], batch: Any) -> Any:
        """The model's training loss (in the check dtype) at the given values.

        On TensorFlow one ``tf.function`` after a first eager evaluation (which builds the
        float64 loss's own state): parameter values and data are its arguments, so new
        coordinates, new values and new batches of the same shape reuse the trace (``traces``
        counts them).
        """
        if keras.backend.backend() != "tensorflow" or not self._eager_done:
            self._eager_done = True
            return self._loss_eager(values, frozen, batch)
        if self._compiled is None:
            import tensorflow as tf

            self._compiled = tf.function(self._loss_eager, reduce_retracing=True)
        return self._compiled(values, frozen, batch)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Checked variable path → shape."""
        return {n: tuple(w.shape) for n, w in zip(self.names, self.trainable_sources, strict=True)}

    def check(
        self,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        data: Any = None,
        step: int | None = None,
        tensors: Sequence[int] | None = None,
        sample_seed: Sequence[int] | int | None = None,
    ) -> CheckReport:
        """One check on ``(x, y, sample_weight)`` (with ``loss_fn``: on ``data``, as
        ``train_step`` receives it; default ``(x, y, sample_weight)`` packed as Keras packs it);
        the model is left exactly as it was."""
        started = time.perf_counter()
        rng = np.random.default_rng(self.seed if sample_seed is None else sample_seed)
        eval_seed = int(rng.integers(2**31))
        if self.mode == "modules" or self._too_large():
            return self._check_layers(x, y, sample_weight, data, step, eval_seed, started)
        chosen = list(range(len(self.names))) if tensors is None else list(tensors)
        if self.loss_fn is not None:
            batch = data if data is not None else _pack(x, y, sample_weight)
        else:
            batch = (x, y, sample_weight)
        problem = _Problem(self, batch, eval_seed)
        return check_problem(
            problem,
            tensors=chosen,
            num_params=self.num_params,
            mode=self.mode,
            rng=rng,
            rtol=self.rtol,
            eps=self.eps,
            step=step,
            notes=list(self.notes) + problem.notes,
            started=started,
            framework="keras",
        )

    def _too_large(self) -> bool:
        """Whether float64 values of the model's weights would exceed ``max_check_memory`` (or
        the free memory of the model's device, when it is ``None``)."""
        if self.dtype_name != "float64":
            return False
        from gradwatch.keras.local_backends import float64_bytes, memory_limit

        limit = memory_limit(self.model, self.max_check_memory)
        return limit is not None and float64_bytes(self.model.weights) > limit

    def _layer_patterns(self) -> tuple[Any, Any]:
        """``include``/``exclude`` on layer paths: as given in ``mode="modules"``; otherwise (over
        the memory limit) the variable-path patterns turned into the layers that hold a selected
        variable (``include`` given) or none (``exclude`` only)."""
        include, exclude = self._patterns
        if self.mode == "modules" or not (include or exclude):
            return include, exclude
        from gradwatch.keras.localize import _weights, layer_tree

        chosen = {id(w) for w in self.trainable_sources}
        holding = [(n, [w for _, w in _weights(layer)[0]]) for n, layer in layer_tree(self.model)]
        holders = [(n, any(id(w) in chosen for w in ws)) for n, ws in holding if ws]
        return holder_patterns(holders, bool(include))

    def _check_layers(
        self,
        x: Any,
        y: Any,
        sample_weight: Any,
        data: Any,
        step: int | None,
        seed: int,
        started: float,
    ) -> CheckReport:
        """``mode="modules"``: each layer's own backward checked alone
        (:class:`~gradwatch.keras.localize.KerasLocalizer`), as a check report."""
        if self._localizer is None:
            from gradwatch.keras.localize import KerasLocalizer

            include, exclude = self._layer_patterns()
            self._localizer = KerasLocalizer(
                self.model,
                loss=self.loss,
                loss_fn=self.loss_fn,
                seed=self.seed,
                include=include,
                exclude=exclude,
                max_check_memory=self.max_check_memory,
                rtol=self.rtol,
                eps=self.eps,
            )
        found: LocalizationReport = self._localizer.localize(
            x, y, sample_weight, data=data, seed=seed
        )
        precision = self._localizer.precision  # float32 on JAX without JAX_ENABLE_X64
        rtol = tolerances_for(np.dtype(precision), self.rtol).rtol
        notes = list(self.notes)
        if self.mode != "modules":
            chosen = any(self._patterns)
            notes.append(
                f"mode={self.mode!r} needs float64 values of every weight, more than the "
                f"memory limit: each layer's own backward was checked instead (as "
                f"mode='modules')"
                + (
                    "; include/exclude selected the layers holding those variables"
                    if chosen
                    else ""
                )
            )
        return found.as_check(rtol=rtol, step=step, dtype=precision, notes=notes, started=started)


def check_gradients(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    sample_weight: Any = None,
    loss: Any = None,
    num_params: int = 32,
    mode: str = "coordinate",
    dtype: str | None = "float64",
    eps: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    max_check_memory: int | None = None,
) -> CheckReport:
    """Compare a Keras model's autodiff gradients with central finite differences.

    The compiled loss (plus ``model.losses``, as ``compute_loss`` does) is checked, unless
    ``loss=`` is given. Runs in training mode on a float64 twin with the dropout seed state held
    fixed; the model's variables, BatchNorm statistics, seed state, metrics and optimizer state are
    bit-identical afterwards.

    Args:
        model: A built Keras 3 model.
        x: Inputs (arrays, tensors, or a dict/list of them).
        y: Targets.
        sample_weight: Optional sample weights.
        loss: Anything ``model.compile(loss=...)`` accepts.
        num_params, mode, dtype, eps, rtol, seed, include, exclude: as
            :func:`gradwatch.torch.check_gradients`; ``include``/``exclude`` match variable paths
            (layer paths such as ``block.act`` in ``mode="modules"``, which checks each layer's
            own backward alone, as :func:`gradwatch.keras.localize` does).
        max_check_memory: Bytes the float64 values of the weights may take (``None``: the free
            memory of the model's device, where the backend reports it); over it, each layer is
            checked alone, as :func:`gradwatch.keras.localize` does under the same limit.

    Raises:
        ValueError: An uncompiled model without ``loss=``, an unbuilt model, bad arguments.
    """
    checker = KerasChecker(
        model,
        loss=loss,
        num_params=num_params,
        mode=mode,
        dtype=dtype,
        eps=eps,
        rtol=rtol,
        seed=seed,
        include=include,
        exclude=exclude,
        max_check_memory=max_check_memory,
    )
    return checker.check(x, y, sample_weight)


def assert_gradients(
    model: Any, x: Any, y: Any = None, *, allow_inconclusive: bool = False, **kwargs: Any
) -> CheckReport:
    """Like :func:`check_gradients`, but raise :class:`~gradwatch.GradientCheckError` unless it passed.

    A check that verified nothing fails the test too; gradwatch's own frames are hidden from
    pytest tracebacks.

    Args:
        model: As for :func:`check_gradients`.
        x: As for :func:`check_gradients`.
        y: As for :func:`check_gradients`.
        allow_inconclusive: Return an ``inconclusive`` report instead of raising.
        **kwargs: Any keyword argument of :func:`check_gradients`.

    Raises:
        GradientCheckError: On ``fail``, and on ``inconclusive`` (which entries could not be
            judged and why) unless ``allow_inconclusive=True``; ``.report`` holds the report.
    """
    __tracebackhide__ = True
    report = check_gradients(model, x, y, **kwargs)
    return raise_unless_verified(report, allow_inconclusive=allow_inconclusive)


# -- probe data for the callback ------------------------------------------------------------------


PROBE_DATA = (
    "(x, y) or (x, y, sample_weight) arrays (or x alone), a tf.data.Dataset or a "
    "keras.utils.PyDataset"
)


def _is_tf_dataset(data: Any) -> bool:
    return type(data).__name__.endswith("Dataset") and hasattr(data, "take")


def _arrays(value: Any) -> bool:
    """Whether ``value`` is what Keras takes as ``x``, ``y`` or ``sample_weight``: a tensor or
    array, a dict or a list of them, or nested numbers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return True
    if isinstance(value, Mapping):
        return bool(value) and all(_arrays(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_arrays(item) for item in value)
    return False


def check_probe_data(data: Any) -> None:
    """``ValueError`` naming ``data`` unless :func:`probe_batch` can take it.

    A dataset's items are read only at ``on_train_begin``; here only its kind is judged.

    Example:
        >>> import numpy as np
        >>> check_probe_data((np.ones((2, 3)), np.zeros((2, 1))))
        >>> check_probe_data("x")
        Traceback (most recent call last):
        ...
        ValueError: data must be None or probe data: (x, y) or (x, y, sample_weight) arrays (or x alone), a tf.data.Dataset or a keras.utils.PyDataset; got 'x'
    """
    if data is None or isinstance(data, keras.utils.PyDataset) or _is_tf_dataset(data):
        return
    if isinstance(data, (tuple, list)):
        ok = 1 <= len(data) <= 3 and _arrays(data[0])
        ok = ok and all(item is None or _arrays(item) for item in data[1:])
    else:
        ok = not isinstance(data, (int, float)) and _arrays(data)
    if not ok:
        if isinstance(data, (tuple, list)):
            shown = f"a {type(data).__name__} of ({', '.join(type(d).__name__ for d in data)})"
        else:
            shown = repr(data) if len(repr(data)) <= 80 else f"a {type(data).__name__}"
        raise ValueError(f"data must be None or probe data: {PROBE_DATA}; got {shown}")


def probe_batch(data: Any) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` from arrays, a ``tf.data.Dataset`` or a ``keras.utils.PyDataset``."""
    if isinstance(data, keras.utils.PyDataset):
        item = data[0]
    elif _is_tf_dataset(data):
        item = next(iter(data.take(1)))
    elif isinstance(data, (tuple, list)):
        item = tuple(data)
    else:
        item = (data,)
    if not isinstance(item, (tuple, list)):
        item = (item,)
    item = tuple(item) + (None,) * (3 - len(item))
    if len(item) > 3:
        raise ValueError(
            f"data must be (x, y) or (x, y, sample_weight), got a tuple of {len(item)} items"
        )
    return item[0], item[1], item[2]


def check_probe_shapes(model: Any, x: Any) -> None:
    """``ValueError`` naming the expected and given shapes when probe inputs cannot fit the model."""
    expected = getattr(model, "input_shape", None)
    if expected is None or isinstance(x, Mapping):
        return
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    exp = list(expected) if isinstance(expected, list) else [expected]
    if len(xs) != len(exp):
        raise ValueError(f"data= has {len(xs)} inputs but the model expects {len(exp)}")
    for given, want in zip(xs, exp, strict=True):
        shape = tuple(np.shape(given))
        if want is None:
            continue
        want_t = tuple(want)
        if len(shape) != len(want_t) or any(
            w is not None and w != s for w, s in zip(want_t[1:], shape[1:], strict=False)
        ):
            raise ValueError(
                f"data= does not fit the model: expected inputs of shape {want_t}, got {shape}"
            )
