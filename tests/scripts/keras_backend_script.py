"""Core Keras checks on one backend, in its own process: python tests/scripts/keras_backend_script.py OUT.

KERAS_BACKEND must be set by the caller (torch or jax). Writes OUT as JSON.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import keras
import numpy as np

from gradwatch.keras import GradWatch, check_gradients, localize
from tests.helpers import keras_models as km
from tests.helpers.keras_bugs_any import CASES, functional


class ScaledDense(keras.layers.Dense):
    """A Dense layer whose kernel reaches the output through a stop_gradient (backend-agnostic)."""

    def call(self, x):
        return keras.ops.matmul(x, keras.ops.stop_gradient(self.kernel)) + self.bias


def scaled_identity(scale: float):
    """Identity forward, ``scale * g`` backward: a small backward bug on any backend."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        class Scaled(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return scale * g

        return Scaled.apply
    if backend == "jax":
        import jax

        @jax.custom_vjp
        def fn(x):
            return x

        fn.defvjp(lambda x: (x, None), lambda _, g: (scale * g,))
        return fn
    from tests.helpers.keras_bugs_tf import scaled_identity as tf_scaled

    return tf_scaled(scale)


class NoConfig(keras.layers.Layer):
    """A layer without get_config; ``scale`` plants a backward bug after its matmul."""

    def __init__(self, units, scale=None):
        super().__init__()
        self.units = units
        self.fn = scaled_identity(scale) if scale is not None else (lambda h: h)

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform")

    def call(self, x):
        return self.fn(keras.ops.matmul(x, self.w))

    def get_config(self):
        raise NotImplementedError


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(16)
        self.head = keras.layers.Dense(4)

    def call(self, x, training=False):
        return self.head(keras.ops.tanh(self.first(x)))


def unclonable() -> dict[str, object]:
    """Float64 on models clone_model cannot copy, and a x0.9 backward bug caught."""
    out: dict[str, object] = {}
    x, y = km.data("mlp")
    keras.utils.set_random_seed(0)
    sub = Subclassed()
    sub(x[:2])
    models = {
        "subclassed": km.compiled(sub),
        "no_config": km.compiled(
            keras.Sequential([keras.Input((12,)), NoConfig(16), keras.layers.Dense(4)])
        ),
        "lambda_loss": km.compiled(
            keras.Sequential([keras.Input((12,)), keras.layers.Dense(16), keras.layers.Dense(4)]),
            loss=lambda yt, yp: keras.ops.mean(
                (yp - keras.ops.one_hot(keras.ops.cast(yt, "int32"), 4)) ** 2, axis=-1
            ),
        ),
        "scaled_0.9": km.compiled(
            keras.Sequential(
                [
                    keras.Input((12,)),
                    NoConfig(16, scale=0.9),
                    keras.layers.Activation("tanh"),
                    keras.layers.Dense(4),
                ]
            )
        ),
    }
    for name, model in models.items():
        r = check_gradients(model, x, y)
        out[name] = {
            "verdict": r.verdict,
            "dtype": r.dtype,
            "max_rel_error": r.max_rel_error,
            "notes": list(r.notes),
        }
    return out


def _state(model) -> list[np.ndarray]:
    """Every model and optimizer variable (weights, BatchNorm statistics, seed states)."""
    variables = list(model.variables) + list(model.optimizer.variables)
    return [np.array(keras.ops.convert_to_numpy(v.value)).copy() for v in variables]


def _torch_rng():
    if keras.backend.backend() != "torch":
        return None
    import torch

    return torch.get_rng_state().numpy().copy()


def localizations() -> dict[str, object]:
    """localize on each planted bug and correct model, and layer by layer under a tiny limit."""
    x, y = km.data("mlp", seed=3, n=16)
    out: dict[str, object] = {}
    runs = {name: (make, None) for name, (make, _) in CASES.items()}
    # 2720 bytes of float64 weights; `first` alone takes 1664: checked layer by layer, it is skipped.
    runs["by_layer_scaled"] = (lambda: functional("scaled"), 1000)
    runs["by_layer_correct"] = (lambda: functional(None), 1000)
    for name, (make, limit) in runs.items():
        keras.utils.set_random_seed(1)
        model = make()
        before, rng = _state(model), _torch_rng()
        started = time.perf_counter()
        r = localize(model, x, y, max_check_memory=limit)
        seconds = time.perf_counter() - started
        after, rng_after = _state(model), _torch_rng()
        out[name] = {
            "culprits": list(r.culprits),
            "verdicts": {m.name: m.verdict for m in r.modules},
            "errors": {m.name: m.max_rel_error for m in r.modules},
            "skipped": [list(s) for s in r.skipped],
            "notes": list(r.notes),
            "seconds": seconds,
            "unchanged": all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
            and (rng is None or np.array_equal(rng, rng_after))
            and all("call" not in vars(layer) for layer in model._flatten_layers()),
        }
    return out


def modules_checks() -> dict[str, object]:
    """check_gradients(mode="modules") on each planted bug and correct model."""
    x, y = km.data("mlp", seed=3, n=16)
    out: dict[str, object] = {}
    for name, (make, _) in CASES.items():
        keras.utils.set_random_seed(1)
        r = check_gradients(make(), x, y, mode="modules")
        out[name] = {
            "verdict": r.verdict,
            "dtype": r.dtype,
            "modules": sorted({e.module for e in r.events if e.module}),
        }
    return out


def main() -> None:
    out: dict[str, object] = {"backend": keras.backend.backend()}
    verdicts = {}
    for name, factory, kind in km.healthy()[:3]:
        keras.utils.set_random_seed(0)
        model = factory()
        x, y = km.data(kind)
        before = [np.array(keras.ops.convert_to_numpy(v.value)).copy() for v in model.variables]
        r = check_gradients(model, x, y)
        after = [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.variables]
        verdicts[name] = {
            "verdict": r.verdict,
            "dtype": r.dtype,
            "max_rel_error": r.max_rel_error,
            "notes": list(r.notes),
            "unchanged": all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)),
        }
    out["healthy"] = verdicts
    out["unclonable"] = unclonable()
    out["localize"] = localizations()
    out["modules"] = modules_checks()
    keras.utils.set_random_seed(0)
    bad = km.compiled(
        keras.Sequential(
            [
                keras.Input((12,)),
                ScaledDense(16, name="cut"),
                keras.layers.Activation("tanh"),
                keras.layers.Dense(4),
            ]
        )
    )
    r = check_gradients(bad, *km.data("mlp"))
    out["bug"] = {"verdict": r.verdict, "events": [(e.kind, e.param) for e in r.events]}
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp", n=64)
    cb = GradWatch(check_every_n_steps=2, data=(x[:16], y[:16]))
    hist = model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    out["callback"] = {
        "verdicts": [r.verdict for r in cb.reports],
        "steps": [r.step for r in cb.reports],
        "norms_logged": "gradwatch_grad_norm" in hist.history,
    }
    # A NaN batch: on the torch backend the guard skips its update (one boolean read per step)
    # and fit halts on that step; the weights stay finite.
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp", n=16 * 8)
    x[16 * 2 : 16 * 3] = np.nan
    cb = GradWatch(enable_checks=False)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    out["nan"] = {
        "events": [(e.kind, e.step) for e in cb.events],
        "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "finite": all(
            bool(np.isfinite(keras.ops.convert_to_numpy(v.value)).all())
            for v in model.variables  # BatchNorm's moving statistics put back too
        ),
    }
    Path(sys.argv[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
