"""The Keras callback under what real ``fit`` runs do: XLA, interruptions, late-built models,
overflowing and non-finite gradients (TensorFlow backend, oneDNN as the machine has it)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras

from gradwatch.keras import GradWatch
from gradwatch.keras.taps import CAPACITY
from tests.helpers import keras_models as km

pytestmark = [
    pytest.mark.filterwarnings("ignore::gradwatch.GradientHealthWarning"),
    pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend"),
]


def finite(variables):
    return all(np.isfinite(np.asarray(v.numpy(), dtype=np.float64)).all() for v in variables)


def xla_mlp():
    model = km.mlp()
    model.compile(optimizer="adam", loss=model.loss, jit_compile=True)
    return model


def test_default_callback_under_jit_compile_checks_the_live_batch():
    keras.utils.set_random_seed(0)
    model = xla_mlp()
    x, y = km.data("mlp", n=16 * 6)
    cb = GradWatch(check_every_n_steps=2)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert model.jit_compile is True
    assert [r.step for r in cb.reports] == [1, 3, 5]
    assert all(r.verdict == "pass" for r in cb.reports), [str(r) for r in cb.reports]
    assert cb.events == []


def test_jit_capture_keeps_the_batch_rows_and_says_when_it_trims():
    keras.utils.set_random_seed(0)
    model = xla_mlp()
    x, y = km.data("mlp", n=2 * CAPACITY * 2)
    cb = GradWatch(check_every_n_steps=1)
    with pytest.warns(UserWarning, match=f"first {CAPACITY} rows of batches of {2 * CAPACITY}"):
        model.fit(x, y, batch_size=2 * CAPACITY, epochs=1, callbacks=[cb], verbose=0)
    assert len(cb.reports) == 2 and all(r.verdict == "pass" for r in cb.reports)


def test_jit_nonfinite_update_is_skipped_and_fit_halts():
    keras.utils.set_random_seed(0)
    model = xla_mlp()
    x, y = km.data("mlp", n=16 * 20)
    x[16 * 2 : 16 * 3] = np.nan
    cb = GradWatch(enable_checks=False)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert [(e.kind, e.step) for e in cb.events] == [("nonfinite", 3)]
    assert finite(model.variables) and finite(model.optimizer.variables)
    assert model.stop_training


def test_a_finite_gradient_whose_float32_norm_overflows_is_exploding_not_nonfinite():
    keras.utils.set_random_seed(0)
    model = km.mlp()

    def huge(y_true, y_pred):
        return 1e25 * keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=huge)
    x, y = km.data("mlp", n=32)
    cb = GradWatch(enable_checks=False, on_explode="halt")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert {e.kind for e in cb.events} == {"exploding"}, [e.message for e in cb.events]
    assert all(np.isfinite(e.value) for e in cb.events)


class Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 2:
            raise KeyboardInterrupt


def wrapped_attributes(model):
    opt = model.optimizer
    names = [f"model.{k}" for k in ("train_step", "make_train_function") if k in vars(model)]
    return names + [f"optimizer.{k}" for k in ("apply",) if k in vars(opt)]


def test_an_interrupted_fit_leaves_no_wrapper_behind_for_the_next_fit():
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp", n=16 * 6)
    cb = GradWatch(check_every_n_steps=1)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb, Interrupt()], verbose=0)
    assert wrapped_attributes(model)  # on_train_end never ran
    checks = len(cb.reports)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # a fit without gradwatch
    assert wrapped_attributes(model) == []
    assert len(cb.reports) == checks  # its step ran no gradwatch code
    # and a later gradwatch fit works as usual
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert len(cb.reports) == 6 and wrapped_attributes(model) == []


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(4)

    def call(self, x):
        return self.out(self.hidden(x))


def test_a_subclassed_model_built_during_fit_gets_norms_and_a_nan_halt():
    keras.utils.set_random_seed(0)
    model = Subclassed()
    model.compile(
        optimizer=keras.optimizers.SGD(1e4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    assert not model.built
    x, y = km.data("mlp", n=16 * 40)
    cb = GradWatch(enable_checks=False)
    history = model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    kinds = [e.kind for e in cb.events]
    assert "nonfinite" in kinds, kinds
    assert len(history.history["loss"]) == 1  # halted in the first epoch
    assert finite(model.trainable_variables)
