"""Health rules on real Keras architectures in short fits: no false vanishing while a model
learns (attention's key bias, BatchNorm betas before conv → BatchNorm, slowly starting attention
kernels), while a 20-layer sigmoid MLP is flagged within 10 steps (TensorFlow backend)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras

from gradwatch.keras import GradWatch

pytestmark = [
    pytest.mark.filterwarnings("ignore::gradwatch.GradientHealthWarning"),
    pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend"),
]


def vanishing(cb):
    return sorted({e.param for e in cb.events if e.kind == "vanishing"})


def encoder(vocab=50, length=16, dim=32, blocks=2):
    inp = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, dim)(inp)
    for _ in range(blocks):
        a = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)(h, h)
        h = keras.layers.LayerNormalization()(h + a)
        f = keras.layers.Dense(dim)(keras.layers.Dense(64, activation="relu")(h))
        h = keras.layers.LayerNormalization()(h + f)
    out = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    return model


def test_transformer_encoder_learns_without_vanishing_events():
    # 0.1 warned about every key bias (true gradient zero: softmax ignores a per-query shift)
    # and the first block's query/key kernels (‖g‖/‖w‖ 2e-4 to 4e-4 of the median).
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (40 * 32, 16)).astype("int32")
    y = (x == x[:, :1]).sum(axis=1).clip(0, 3).astype("int32")  # how often the first token recurs
    model = encoder()
    cb = GradWatch(enable_checks=False, on_vanish="ignore")
    history = model.fit(x, y, batch_size=32, epochs=1, callbacks=[cb], verbose=0)
    assert vanishing(cb) == []
    assert history.history["loss"][-1] < 1.0  # it learns (from ~1.4)


@pytest.mark.slow  # about 60 s on two shared cores
def test_mobilenet_v3_small_learns_without_vanishing_events():
    # 0.1 warned about all 11 expanded_conv_*_project_bn/beta (BatchNorm → 1×1 conv → BatchNorm).
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 24 * 16)
    x = rng.normal(size=(len(y), 32, 32, 3)).astype("float32")
    for c in range(3):
        x[y == c + 1, :, :, c] += 1.0
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), classes=4)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    cb = GradWatch(enable_checks=False, on_vanish="ignore")
    history = model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert vanishing(cb) == []
    assert np.isfinite(history.history["loss"][-1])


def test_twenty_layer_sigmoid_mlp_vanishes_within_ten_steps():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10 * 16, 12)).astype("float32")
    y = x[:, :4].argmax(axis=1)
    layers = [keras.Input((12,))] + [
        keras.layers.Dense(16, activation="sigmoid") for _ in range(19)
    ]
    model = keras.Sequential([*layers, keras.layers.Dense(4)])
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    cb = GradWatch(enable_checks=False, on_vanish="ignore")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    events = [e for e in cb.events if e.kind == "vanishing"]
    assert model.trainable_variables[0].path in {e.param for e in events}
    assert max(e.step for e in events) <= 10
    assert model.trainable_variables[-2].path not in {e.param for e in events}
