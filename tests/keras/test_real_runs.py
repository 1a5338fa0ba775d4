"""The Keras callback under what real ``fit`` runs do: XLA, interruptions, late-built models,
overflowing and non-finite gradients (TensorFlow backend, oneDNN as the machine has it)."""

from __future__ import annotations

import os
import re

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


def bn_mlp(optimizer=None):
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(4),
        ]
    )
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_loss_scale_optimizer_skips_are_counted_and_a_run_of_them_is_an_event():
    keras.utils.set_random_seed(0)
    model = bn_mlp(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()))
    x, y = km.data("mlp", n=16 * 40)
    x[16 * 2 : 16 * 3] = np.nan  # one bad batch: skipped by the scaler, state put back
    cb = GradWatch(enable_checks=False)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert cb.events == [] and cb.skipped_steps == 1
    assert finite(model.variables)
    x[16 * 2 :] = np.nan  # bad from batch 3 on: the scale collapses
    cb = GradWatch(enable_checks=False)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert [e.kind for e in cb.events] == ["nonfinite"]
    assert re.search(
        r"LossScaleOptimizer skipped \d+ optimizer steps in a row", cb.events[0].message
    )
    assert model.stop_training and finite(model.variables)


def test_no_skipped_update_goes_unreported_with_long_executions_or_sparse_norms():
    keras.utils.set_random_seed(0)
    x, y = km.data("mlp", n=16 * 40)
    x[16 * 2 : 16 * 3] = np.nan  # step 3
    model = bn_mlp()
    model.compile(optimizer="adam", loss=model.loss, steps_per_execution=32)
    cb = GradWatch(enable_checks=False, log_every_n_steps=1)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert [(e.kind, e.step) for e in cb.events] == [("nonfinite", 3)]
    assert finite(model.variables)
    model = bn_mlp()
    cb = GradWatch(enable_checks=False, norm_every_n_steps=2)  # step 3 is not sampled... (1, 3, 5)
    x[16 * 2 : 16 * 3] = 1.0
    x[16 * 3 : 16 * 4] = np.nan  # step 4 is not sampled
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert [(e.kind, e.step) for e in cb.events] == [("nonfinite", 4)]
    assert finite(model.variables)


def test_steps_and_checks_under_steps_per_execution_follow_the_optimizer():
    keras.utils.set_random_seed(0)
    model = km.mlp()
    model.compile(optimizer="adam", loss=model.loss, steps_per_execution=2)
    x, y = km.data("mlp", n=16 * 7)  # 7 batches: the last execution of each epoch is short
    cb = GradWatch(check_every_n_steps=3)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, callbacks=[cb], verbose=0)
    assert cb._step == int(model.optimizer.iterations) == 14
    # Executions [1, 2] [3, 4] [5, 6] [7] | [8, 9] [10, 11] [12, 13] [14]; steps 1, 4, 7, 10, 13
    # are due, and each execution holding one is checked at its last step.
    assert [r.step for r in cb.reports] == [2, 4, 7, 11, 13]
