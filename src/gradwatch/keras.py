"""Keras 3 adapter: ``check_gradients`` / ``assert_gradients`` and the ``GradWatch`` callback.

The check computes the model's loss at arbitrary parameter values without touching the model: a
float64 twin (layers cloned with a float64 dtype, the loss rebuilt as explicit float64 objects,
weights copied in at each check) is evaluated inside a ``keras.StatelessScope`` in training mode,
with the non-trainable state (BatchNorm statistics, dropout seed state) held fixed so every
evaluation draws the same dropout mask, and the updated state discarded. Gradients come from the
backend's own autodiff (``tf.GradientTape``, ``torch.autograd.grad``, ``jax.value_and_grad``).

Example:
    >>> import numpy as np, keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(loss="mse")
    >>> check_gradients(model, np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")).verdict
    'pass'
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from gradwatch import _validate as v
from gradwatch import tags
from gradwatch.core.check import Perturbation, check_problem
from gradwatch.core.policy import Action
from gradwatch.errors import GradientCheckError
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.sinks import TensorBoardSink
from gradwatch.watch import HEALTH_BLOCK, WatchConfig, Watcher, WatchRecords, global_norm

__all__ = ["GradWatch", "KerasChecker", "assert_gradients", "check_gradients"]

logger = logging.getLogger("gradwatch")


# -- the float64 twin -----------------------------------------------------------------------------


def _retype(layer: Any, dtype: str) -> Any:
    config = layer.get_config()
    if "dtype" not in config:
        return layer.__class__.from_config(config)
    config["dtype"] = dtype
    return layer.__class__.from_config(config)


class _FunctionLoss(keras.losses.Loss):  # type: ignore[misc]
    """A loss function as a ``Loss`` object with an explicit dtype (inputs are cast to it)."""

    def __init__(self, fn: Callable[..., Any], dtype: str, reduction: str | None = "none") -> None:
        super().__init__(name=getattr(fn, "__name__", "loss"), dtype=dtype, reduction=reduction)
        self.fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.fn(y_true, y_pred)


class _Reduced(keras.losses.Loss):  # type: ignore[misc]
    """Reduces an unreduced loss itself, in its dtype.

    Keras 3.15 reduces ``sum_over_batch_size`` with ``ops.divide_no_nan``, which returns float32
    for float64 inputs on the torch backend; a plain division keeps float64 everywhere.
    """

    def __init__(self, inner: keras.losses.Loss, reduction: str | None, dtype: str) -> None:
        super().__init__(name=inner.name, dtype=dtype, reduction=None)
        self.inner = inner
        self.mode = reduction or "none"

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        values = self.inner(y_true, y_pred, sample_weight)
        if self.mode == "none" or len(values.shape) == 0:
            return values
        total = keras.ops.sum(values)
        if self.mode == "sum":
            return total
        if self.mode == "mean_with_sample_weight" and sample_weight is not None:
            weights = keras.ops.cast(keras.ops.sum(sample_weight), total.dtype)
            return total / weights
        return total / float(max(1, math.prod(int(d) for d in values.shape)))


def _loss_in(loss: Any, dtype: str) -> Any:
    """The same loss (structure kept) as explicit objects computing in ``dtype``."""
    if loss is None:
        return None
    if isinstance(loss, Mapping):
        return {k: _loss_in(x, dtype) for k, x in loss.items()}
    if isinstance(loss, (list, tuple)):
        return type(loss)(_loss_in(x, dtype) for x in loss)
    obj = keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(obj, keras.losses.Loss):
        config = obj.get_config()
        reduction = config.get("reduction", "sum_over_batch_size")
        config.update(dtype=dtype, reduction="none")
        try:
            inner = obj.__class__.from_config(config)
        except Exception:
            return _Reduced(_FunctionLoss(obj, dtype, reduction=None), "none", dtype)
        return _Reduced(inner, reduction, dtype)
    if callable(obj):
        return _Reduced(_FunctionLoss(obj, dtype), "sum_over_batch_size", dtype)
    raise ValueError(f"loss must be anything model.compile(loss=...) accepts, got {loss!r}")


def _compiled_loss(model: Any) -> Any:
    return getattr(model, "loss", None)


def _build_twin(model: Any, loss: Any, dtype: str) -> tuple[Any, list[str]]:
    """A clone of ``model`` in ``dtype`` compiled with ``loss`` in ``dtype``; or the model itself."""
    notes: list[str] = []
    twin = model
    if dtype != _model_dtype(model):
        try:
            twin = keras.models.clone_model(
                model, clone_function=lambda layer: _retype(layer, dtype)
            )
            if not twin.built:
                twin.build(model.input_shape if hasattr(model, "input_shape") else None)
            if len(twin.weights) != len(model.weights):
                raise ValueError("the clone has different weights")
        except Exception as exc:
            twin = model
            note = (
                f"the model could not be cloned in {dtype} ({type(exc).__name__}: {exc}); checked "
                f"in {_model_dtype(model)} instead, where bugs smaller than about 40% of a "
                f"gradient are invisible"
            )
            notes.append(note)
            warnings.warn(f"gradwatch: {note}", UserWarning, stacklevel=4)
    if twin is not model:
        compile_config = model.get_compile_config() if model.compiled else {}
        weights = (compile_config or {}).get("loss_weights")
        # CompileLoss takes its dtype from floatx when it is created: create it under `dtype`,
        # or it casts y_pred back to float32 and every quotient comes out quantised.
        floatx = keras.config.floatx()
        try:
            keras.config.set_floatx(dtype)
            twin.compile(loss=_loss_in(loss, dtype), loss_weights=weights)
        finally:
            keras.config.set_floatx(floatx)
    return twin, notes


def _model_dtype(model: Any) -> str:
    for w in model.trainable_weights:
        return str(w.dtype)
    return str(keras.config.floatx())


# -- backend-specific gradient -----------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray[Any, Any]:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _value_and_grad(
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
def _floatx(dtype: str) -> Iterator[None]:
    """``floatx`` set to ``dtype`` while the twin computes: some backend ops (the torch backend's
    cross-entropies) create intermediate tensors in floatx and would round the loss to float32."""
    saved = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(saved)


@contextlib.contextmanager
def _torch_rng(seed: int) -> Iterator[None]:
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


# -- the checker -------------------------------------------------------------------------------


class _Problem:
    def __init__(
        self,
        checker: KerasChecker,
        x: Any,
        y: Any,
        sample_weight: Any,
        chosen: list[int],
        eval_seed: int,
    ) -> None:
        self.c = checker
        twin = checker.twin
        dtype = checker.dtype_name
        self._names = checker.names
        src_tr = [checker.trainable_sources[i] for i in range(len(checker.names))]
        self._values = [np.asarray(_to_numpy(w.value), dtype=dtype) for w in src_tr]
        self._shapes = [tuple(a.shape) for a in self._values]
        # Non-trainable state in the twin's dtypes (seed states stay integers).
        self._ntr = [
            keras.ops.convert_to_tensor(
                np.asarray(_to_numpy(src.value)).astype(dst.dtype, copy=False), dtype=dst.dtype
            )
            for src, dst in zip(
                checker.model.non_trainable_variables, twin.non_trainable_variables, strict=True
            )
        ]
        self._frozen_trainable = [
            keras.ops.convert_to_tensor(
                np.asarray(_to_numpy(w.value)).astype(w.dtype), dtype=w.dtype
            )
            for w in checker.frozen_twin_vars
        ]
        self.x = _cast_tree(x, dtype)
        self.y = _cast_tree(y, dtype)
        self.sample_weight = _cast_tree(sample_weight, dtype)
        self.eval_seed = eval_seed
        self.precision = dtype
        self.notes: list[str] = []
        probe = [keras.ops.convert_to_tensor(a, dtype=dtype) for a in self._values]
        with _torch_rng(eval_seed):
            probe_loss = float(_to_numpy(self._loss(probe)))
        if dtype == "float64" and keras.backend.backend() == "torch":
            # Measured with Keras 3.15: on the torch backend the float64 twin's loss carries noise
            # of float32 size (about 1e-7 relative): finite differences at a float64 step would
            # be noise. Step and judge as in float32.
            self.precision = "float32"
            self.notes.append(
                "on Keras' torch backend the loss has float32-grade noise, so this check runs "
                "with float32 steps and tolerances: only gross bugs are visible"
            )
        elif (
            dtype == "float64" and probe_loss != 0.0 and float(np.float32(probe_loss)) == probe_loss
        ):
            # A float64 loss that is exactly a float32 number was rounded to float32 on the way
            # (the torch backend's loss reduction in Keras 3.15 does this; the chance that a true
            # float64 value lands on the float32 grid is about 2**-29). Judge the check as a
            # float32 one rather than cry wolf.
            self.precision = "float32"
            self.notes.append(
                f"Keras rounded the loss to float32 on the {keras.backend.backend()} backend, so "
                f"this check has float32 resolution: only gross bugs are visible"
            )
            self._values = [a.astype("float32").astype(dtype) for a in self._values]
        base_vals = [keras.ops.convert_to_tensor(a, dtype=dtype) for a in self._values]
        with _torch_rng(eval_seed):
            self._base, self._grads = _value_and_grad(self._loss, base_vals)
        self.evaluations = 1

    def _loss(self, values: Sequence[Any]) -> Any:
        return self.c.loss_at(
            list(values), self._frozen_trainable, self._ntr, self.x, self.y, self.sample_weight
        )

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
            with _torch_rng(self.eval_seed):
                out[k] = float(_to_numpy(self._loss(vals)))
            self.evaluations += 1
        return out


def _cast_tree(data: Any, dtype: str) -> Any:
    """Floating arrays/tensors in a nested structure → ``dtype``; integers stay as they are."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        return {k: _cast_tree(x, dtype) for k, x in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_cast_tree(x, dtype) for x in data)
    arr = _to_numpy(data)
    if np.issubdtype(arr.dtype, np.floating):
        return keras.ops.convert_to_tensor(arr.astype(dtype), dtype=dtype)
    return keras.ops.convert_to_tensor(arr)


class KerasChecker:
    """A reusable gradient check of one Keras model (the callback keeps one).

    Args:
        model: A built Keras 3 model.
        loss: Anything ``model.compile(loss=...)`` accepts; default the model's compiled loss.
        num_params, mode, dtype, eps, rtol, seed, include, exclude: as :func:`check_gradients`.
    """

    def __init__(
        self,
        model: Any,
        *,
        loss: Any = None,
        num_params: int = 32,
        mode: str = "coordinate",
        dtype: str | None = "float64",
        eps: float | None = None,
        rtol: float | None = None,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
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
        self.eps, self.rtol, self.seed = o.eps, o.rtol, o.seed
        inc, exc = o.include, o.exclude
        if not model.built:
            raise ValueError("the model is not built: call it on data or build() it first")
        if loss is None:
            loss = _compiled_loss(model)
            if loss is None:
                raise ValueError(
                    "the model has no loss: compile it (model.compile(loss=...)) or pass loss=..."
                )
        self.model = model
        self.loss = loss
        trainable = [w for w in model.trainable_variables if "float" in str(w.dtype)]
        if not trainable:
            raise ValueError("the model has no trainable floating-point variables to check")
        chosen = [i for i, w in enumerate(trainable) if v.selected(w.path, inc, exc)]
        if not chosen:
            raise ValueError(
                f"include/exclude left no variable to check; trainable variables are "
                f"{[w.path for w in trainable][:10]}"
            )
        model_dtype = _model_dtype(model)
        self.dtype_name = {"float64": "float64", "float32": "float32", None: model_dtype}[dt]
        if self.dtype_name not in ("float64", "float32"):
            self.dtype_name = "float32"
        twin, self.notes = _build_twin(model, loss, self.dtype_name)
        if twin is model and model_dtype != self.dtype_name:
            self.dtype_name = model_dtype if model_dtype in ("float64", "float32") else "float32"
        self.twin = twin
        if twin is model and not model.compiled:
            raise ValueError("the model must be compiled (or loss= given and the model clonable)")
        twin_trainable = [w for w in twin.trainable_variables if "float" in str(w.dtype)]
        self.names = [trainable[i].path for i in chosen]
        self.trainable_sources = [trainable[i] for i in chosen]
        self.checked_twin_vars = [twin_trainable[i] for i in chosen]
        self.frozen_twin_vars = [w for i, w in enumerate(twin_trainable) if i not in set(chosen)]
        self.frozen_twin_vars += [
            w for w in twin.trainable_variables if "float" not in str(w.dtype)
        ]

        self.traces = 0
        self._compiled: Any = None

    def _loss_eager(
        self, values: list[Any], frozen: list[Any], ntr: list[Any], x: Any, y: Any, sw: Any
    ) -> Any:
        self.traces += 1
        twin = self.twin
        mapping = list(zip(self.checked_twin_vars, values, strict=True))
        mapping += list(zip(self.frozen_twin_vars, frozen, strict=True))
        mapping += list(zip(twin.non_trainable_variables, ntr, strict=True))
        mapping += [(m, m.value) for m in twin.metrics_variables]
        with _floatx(self.dtype_name), keras.StatelessScope(state_mapping=mapping):
            y_pred = twin(x, training=True)
            loss = twin.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, training=True)
        return loss

    def loss_at(
        self, values: list[Any], frozen: list[Any], ntr: list[Any], x: Any, y: Any, sw: Any
    ) -> Any:
        """The twin's training loss at the given values; compiled once on TensorFlow.

        Parameter values and data are arguments of one ``tf.function``, so new coordinates, new
        values and new batches of the same shape reuse the trace (``traces`` counts them).
        """
        if keras.backend.backend() != "tensorflow":
            return self._loss_eager(values, frozen, ntr, x, y, sw)
        if self._compiled is None:
            import tensorflow as tf

            self._compiled = tf.function(self._loss_eager, reduce_retracing=True)
        return self._compiled(values, frozen, ntr, x, y, sw)

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
        step: int | None = None,
        tensors: Sequence[int] | None = None,
        sample_seed: Sequence[int] | int | None = None,
    ) -> CheckReport:
        """One check on ``(x, y, sample_weight)``; the model is left exactly as it was."""
        started = time.perf_counter()
        rng = np.random.default_rng(self.seed if sample_seed is None else sample_seed)
        eval_seed = int(rng.integers(2**31))
        chosen = list(range(len(self.names))) if tensors is None else list(tensors)
        problem = _Problem(self, x, y, sample_weight, chosen, eval_seed)
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
        )


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
            :func:`gradwatch.torch.check_gradients`; ``include``/``exclude`` match variable paths.

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
    )
    return checker.check(x, y, sample_weight)


def assert_gradients(model: Any, x: Any, y: Any = None, **kwargs: Any) -> CheckReport:
    """Like :func:`check_gradients`, but raise :class:`~gradwatch.GradientCheckError` on ``fail``."""
    report = check_gradients(model, x, y, **kwargs)
    if report.verdict == "fail":
        raise GradientCheckError(f"gradient check failed\n{report}", report=report)
    return report


# -- the callback ------------------------------------------------------------------------------


def _probe_batch(data: Any) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` from arrays, a ``tf.data.Dataset`` or a ``keras.utils.PyDataset``."""
    if isinstance(data, keras.utils.PyDataset):
        item = data[0]
    elif type(data).__name__.endswith("Dataset") and hasattr(data, "take"):
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


def _check_shapes(model: Any, x: Any) -> None:
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


class GradWatch(WatchRecords, keras.callbacks.Callback):  # type: ignore[misc]
    """Gradient checks and gradient-health monitoring for ``model.fit``.

    Same arguments as :class:`gradwatch.lightning.GradWatch` (see ``docs/keras.md``), plus:

    Args:
        data: Probe data — ``(x, y)`` / ``(x, y, sample_weight)`` arrays, a ``tf.data.Dataset`` or
            a ``keras.utils.PyDataset`` (its first batch is used). Without it the callback checks
            the live training batches (TensorFlow and torch backends).
        log_dir: TensorBoard summaries go to ``<log_dir>/gradwatch``; ``None`` writes none.

    Example:
        >>> cb = GradWatch(check_every_n_steps=10, on_explode="halt")
        >>> cb.get_config()["check_every_n_steps"]
        10
    """

    def __init__(
        self,
        check_every_n_steps: int | None = None,
        num_params: int = 32,
        mode: str = "coordinate",
        dtype: str | None = "float64",
        enable_checks: bool = True,
        enable_norms: bool = True,
        norm_every_n_steps: int = 1,
        log_every_n_steps: int | None = None,
        vanish_threshold: float = 1e-7,
        explode_threshold: float = 1e3,
        patience: int = 3,
        on_mismatch: str = "warn",
        on_vanish: str = "warn",
        on_explode: str = "warn",
        on_nonfinite: str = "halt",
        max_overhead: float = 0.02,
        seed: int = 0,
        eps: float | None = None,
        rtol: float | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        jsonl_path: str | None = None,
        data: Any = None,
        log_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.config = WatchConfig.from_arguments(locals())
        if log_dir is not None and not isinstance(log_dir, str):
            log_dir = str(log_dir)
        self.data = data
        self.log_dir = log_dir
        self._watcher = Watcher(self.config)
        self._sink = TensorBoardSink(f"{log_dir}/gradwatch") if log_dir else None
        self._checker: KerasChecker | None = None
        self._checks_on = self.config.enable_checks
        self._probe: tuple[Any, Any, Any] | None = None
        self._stash: tuple[Any, Any, Any] | None = None
        self._norm_names: list[str] = []
        self._norm_source: Any = None  # TF: a (HEALTH_BLOCK, n + 1) ring of [norms..., seq]
        self._norm_seq: Any = None  # TF: the in-graph sequence number of the last stored row
        self._finite: Any = None  # TF: whether the last stored row is finite (read every step)
        self._torch_rows: list[tuple[int, Any]] = []  # torch: (seq, norm vector) since last read
        self._seen_seq = 0
        self._since_read = 0
        self._read_every = 1
        self._last_row_only = False
        self._due_var: Any = None
        self._due_now = False
        self._installed: list[tuple[Any, str]] = []
        self._step = 0
        self._t_start = 0.0
        self._last_norm: float | None = None
        self._last_error: float | None = None
        self._warned: set[str] = set()
        self._log_every = self.config.log_every_n_steps or 50

    # -- records -------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        config = self.config.to_dict()
        config.update(data=None, log_dir=self.log_dir)
        return config

    # -- installation --------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        backend = keras.backend.backend()
        self._due_now = False
        self._stash = None
        self._step = int(_to_numpy(model.optimizer.iterations)) if model.optimizer else 0
        shapes = {w.path: tuple(w.shape) for w in model.trainable_variables}
        self._watcher.start(shapes)
        if self.data is not None and self._checks_on:
            x, y, sw = _probe_batch(self.data)
            _check_shapes(model, x)
            self._probe = (x, y, sw)
        if self._checks_on and self._probe is None and backend == "jax":
            raise ValueError(
                "GradWatch on the JAX backend cannot see the training batches (values leave the "
                "jitted step only through its logs): pass data=(x, y) probe data, or "
                "enable_checks=False"
            )
        if not model.compiled or model.optimizer is None:
            raise ValueError("GradWatch needs a compiled model (model.compile(optimizer, loss))")
        if self.config.enable_norms and backend in ("tensorflow", "torch"):
            self._install_norms(model)
        elif self.config.enable_norms:
            self._warn_once(
                "norms-backend",
                f"GradWatch: per-step gradient norms are not available on the {backend} backend "
                f"yet; checks go on",
            )
        if self._checks_on and self._probe is None:
            self._install_capture(model)
        if self._installed:
            model.make_train_function(force=True)

    def _install_norms(self, model: Any) -> None:
        opt = model.optimizer
        inner = getattr(opt, "inner_optimizer", None) or opt  # LossScaleOptimizer: unscaled grads
        original = inner.apply
        backend = keras.backend.backend()
        n = len(model.trainable_variables)
        # Norms stay on the device and are read every HEALTH_BLOCK steps (each row carries its
        # sequence number, starting from the optimizer step), not one device read per step.
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        self._last_row_only = spe > 1  # one callback call per execution: its last step
        self._read_every = 1 if spe > 1 else HEALTH_BLOCK
        self._seen_seq = self._step
        self._since_read = 0
        self._torch_rows = []
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.init_scope():
                self._norm_source = tf.Variable(
                    tf.zeros([HEALTH_BLOCK, n + 1], tf.float64),
                    trainable=False,
                    name="gradwatch_norms",
                )
                self._norm_seq = tf.Variable(
                    tf.constant(self._step, tf.int64), trainable=False, name="gradwatch_seq"
                )
                self._finite = tf.Variable(True, trainable=False, name="gradwatch_finite")
        else:
            self._norm_source = self._torch_rows  # read through _drain_norms

        callback = self

        def apply(grads: Any, trainable_variables: Any = None, *args: Any, **kwargs: Any) -> Any:
            grads = list(grads)
            variables = (
                list(trainable_variables)
                if trainable_variables is not None
                else list(inner._trainable_variables)
            )
            callback._record_norms(grads, variables)
            return original(grads, trainable_variables, *args, **kwargs)

        inner.apply = apply
        self._installed.append((inner, "apply"))

    def _record_norms(self, grads: list[Any], variables: list[Any]) -> None:
        """Called inside the train step (traced on TensorFlow): one reduction, one stored vector."""
        self._norm_names = [v.path for v in variables]
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            # Half squared norms with one fused op per tensor (tf.nn.l2_loss), one sqrt for all.
            halves = []
            for g in grads:
                if g is None:
                    halves.append(tf.constant(0.0, tf.float32))
                    continue
                if isinstance(g, tf.IndexedSlices):
                    unique, inverse = tf.unique(g.indices)
                    g = tf.math.unsorted_segment_sum(g.values, inverse, tf.shape(unique)[0])
                if g.dtype in (tf.float16, tf.bfloat16):
                    g = tf.cast(g, tf.float32)  # a half-precision sum of squares overflows early
                halves.append(tf.cast(tf.nn.l2_loss(g), tf.float32))
            stacked = tf.sqrt(2.0 * tf.cast(tf.stack(halves), tf.float64))
            if self._norm_source.shape[1] != stacked.shape[0] + 1:
                return

            def store() -> Any:
                seq = self._norm_seq.assign_add(1)
                # Read on the host every step: a non-finite gradient can come with a finite loss
                # (oneDNN's ReLU maps NaN to 0), so the loss is no proxy.
                self._finite.assign(tf.reduce_all(tf.math.is_finite(stacked)))
                row = tf.concat([stacked, tf.reshape(tf.cast(seq, tf.float64), [1])], 0)
                self._norm_source.scatter_nd_update(
                    tf.reshape(seq % HEALTH_BLOCK, [1, 1]), tf.reshape(row, [1, -1])
                )
                return tf.constant(0)

            # Under a distribution strategy every replica calls apply: one row per step, from
            # the first replica.
            context = tf.distribute.get_replica_context()
            replica = 0 if context is None else context.replica_id_in_sync_group
            if isinstance(replica, int):
                if replica == 0:
                    store()
            else:
                tf.cond(tf.equal(replica, 0), store, lambda: tf.constant(0))
        else:
            import torch

            dense = [g for g in grads if g is not None]
            norms = (
                torch._foreach_norm([g.to_dense() if g.is_sparse else g for g in dense])
                if dense
                else []
            )
            it = iter(norms)
            if grads:
                stacked = torch.stack(
                    [next(it).float() if g is not None else torch.zeros(()) for g in grads]
                ).detach()
                last = self._torch_rows[-1][0] if self._torch_rows else self._seen_seq
                self._torch_rows.append((last + 1, stacked))
                del self._torch_rows[:-HEALTH_BLOCK]

    def _install_capture(self, model: Any) -> None:
        original = model.train_step
        backend = keras.backend.backend()
        callback = self
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.init_scope():
                self._due_var = tf.Variable(False, trainable=False, name="gradwatch_due")

            def train_step(data: Any) -> Any:
                flat = [tf.convert_to_tensor(t) for t in keras.tree.flatten(data)]

                def stash() -> Any:
                    def keep(*arrays: Any) -> int:
                        values = [a.numpy() for a in arrays]
                        callback._stash = keras.tree.pack_sequence_as(data, values)
                        return 0

                    return tf.py_function(keep, flat, Tout=tf.int32)

                tf.cond(callback._due_var, stash, lambda: tf.constant(0))
                return original(data)
        else:

            def train_step(data: Any) -> Any:
                if callback._due_now:
                    callback._stash = keras.tree.map_structure(
                        lambda t: _to_numpy(t) if t is not None else None, data
                    )
                return original(data)

        model.train_step = train_step
        self._installed.append((model, "train_step"))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        events, action = self._catch_up(final=True)
        try:
            self._after(events, Action(error=action.error))  # nothing left to halt
        finally:
            self._uninstall()
            self._flush()

    def _catch_up(self, *, final: bool) -> tuple[list[GradientEvent], Action]:
        """Judge the norm rows not yet read (and, when ``final``, the last partial block)."""
        events: list[GradientEvent] = []
        action = Action()
        if self._norm_source is not None and self._since_read:
            events, action = self._observe_norms(self._step)
        if final:
            more, last = self._watcher.flush_health()
            events, action = events + more, action.merged(last)
        return events, action

    def _uninstall(self) -> None:
        if not self._installed:
            return
        for obj, name in self._installed:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        self._installed = []
        self._norm_source = self._norm_seq = self._finite = None
        self.model.train_function = None  # rebuilt by the next fit, without gradwatch
        if hasattr(self.model, "make_train_function"):
            self.model.make_train_function(force=True)

    def _flush(self) -> None:
        self._watcher.flush()
        if self._sink is not None:
            self._sink.flush()

    # -- per step ------------------------------------------------------------------------------
    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._t_start = time.perf_counter()
        due = self._checks_on and self._watcher.schedule.due(self._step)
        if due != self._due_now:
            self._due_now = due
            if self._due_var is not None:
                self._due_var.assign(due)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        train_seconds = time.perf_counter() - self._t_start
        self._step += 1
        step = self._step  # optimizer.iterations after the update, as keras.callbacks.TensorBoard
        meta = self._watcher.meta_once()
        if meta is not None and self._sink is not None:
            self._sink.text(tags.META_TAG, json.dumps(meta), step)
            self._sink.layout()
        action = Action()
        events: list[GradientEvent] = []
        if self._norm_source is not None:
            self._since_read += 1
            # A non-finite loss in the logs (already on the host) means: read and judge now.
            urgent = logs is not None and any(
                isinstance(x, float) and not math.isfinite(x) for x in logs.values()
            )
            if self._finite is not None and not urgent:
                urgent = not bool(self._finite.numpy())
            if urgent or self._since_read >= self._read_every:
                events, action = self._observe_norms(step)
        if self._due_now:
            report = self._run_check(step)
            if report is not None:
                sub = self._watcher.observe_report(report)
                action = action.merged(sub)
                events += list(report.events)
                self._last_error = report.max_rel_error
                if self._sink is not None:
                    self._sink.scalars(step, tags.report_scalars(report))
        self._watcher.schedule.record_step(train_seconds)
        if logs is not None:
            if self._last_norm is not None:
                logs["gradwatch_grad_norm"] = self._last_norm
            if self._last_error is not None:
                logs["gradwatch_rel_error"] = self._last_error
        self._after(events, action)

    def _after(self, events: Sequence[GradientEvent], action: Action) -> None:
        """Write the events, then act: raise (writers flushed first) or halt."""
        if self._sink is not None:
            for e in events:
                self._sink.text(tags.EVENTS_TAG, tags.event_text(e), e.step)
        if action.error is not None:
            self._uninstall()
            self._flush()
            raise action.error
        if action.halt:
            self.model.stop_training = True

    def _drain_norms(self, step: int) -> tuple[list[int], np.ndarray[Any, Any]]:
        """Rows stored since the last read, oldest first, with their steps (one device read)."""
        self._since_read = 0
        if self._norm_seq is not None:  # TensorFlow ring
            buf = np.asarray(self._norm_source.numpy(), dtype=np.float64)
            seqs, values = buf[:, -1].astype(np.int64), buf[:, :-1]
        else:  # torch: host list of device vectors
            rows, self._torch_rows[:] = list(self._torch_rows), []
            if not rows:
                return [], np.zeros((0, len(self._norm_names)))
            import torch

            seqs = np.array([q for q, _ in rows], dtype=np.int64)
            values = torch.stack([t for _, t in rows]).cpu().numpy().astype(np.float64)
        fresh = seqs > self._seen_seq
        if not fresh.any():
            return [], values[:0]
        order = np.argsort(seqs[fresh])
        seqs, values = seqs[fresh][order], values[fresh][order]
        self._seen_seq = int(seqs[-1])
        if self._last_row_only:
            return [step], values[-1:]
        return seqs.tolist(), values

    def _observe_norms(self, step: int) -> tuple[list[GradientEvent], Action]:
        steps, values = self._drain_norms(step)
        every = self.config.norm_every_n_steps
        keep = [i for i, s in enumerate(steps) if (s - 1) % every == 0]
        if not keep or not self._norm_names:
            return [], Action()
        steps = [steps[i] for i in keep]
        values = values[keep][:, : len(self._norm_names)]
        write = [(s - 1) % self._log_every == 0 for s in steps]
        events, action = self._watcher.observe_norm_rows(
            steps, self._norm_names, values, write=write
        )
        self._last_norm = float(np.sqrt(np.sum(values[-1] ** 2)))
        if self._sink is not None:
            for i, w in enumerate(write):
                if w:
                    norms = dict(zip(self._norm_names, values[i].tolist(), strict=True))
                    self._sink.scalars(steps[i], tags.norm_scalars(norms, global_norm(norms)))
        return events, action

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._after(*self._catch_up(final=False))  # the epoch's last steps
        if logs is not None:
            if self._last_norm is not None:
                logs["gradwatch_grad_norm"] = self._last_norm
            if self._last_error is not None:
                logs["gradwatch_rel_error"] = self._last_error

    def _run_check(self, step: int) -> CheckReport | None:
        started = time.perf_counter()
        batch = self._probe if self._probe is not None else self._stash
        self._stash = None
        if batch is None:
            return None
        x, y, sw = keras.utils.unpack_x_y_sample_weight(
            tuple(batch) if isinstance(batch, list) else batch
        )
        report = None
        try:
            model = self.model  # on JAX, Callback.model syncs the variables out of the jitted state
            if self._checker is None or self._checker.model is not model:
                self._checker = KerasChecker(
                    model,
                    num_params=self.config.num_params,
                    mode=self.config.mode,
                    dtype=self.config.dtype,
                    eps=self.config.eps,
                    rtol=self.config.rtol,
                    seed=self.config.seed,
                    include=self.config.include,
                    exclude=self.config.exclude,
                )
            report = self._checker.check(
                x,
                y,
                sw,
                step=step,
                tensors=self._watcher.tensors_for_check(len(self._checker.names)),
                sample_seed=(self.config.seed, step),
            )
        except Exception as exc:
            self._checks_on = False
            self._warn_once(
                "check-error",
                f"GradWatch: the gradient check at step {step} failed ({type(exc).__name__}: {exc}); "
                f"checks are switched off, norms go on",
            )
        self._watcher.schedule.record_check(time.perf_counter() - started)
        decision = self._watcher.schedule_decision(step)
        if self._sink is not None:
            self._sink.text(tags.SCHEDULE_TAG, decision, step)
        return report
