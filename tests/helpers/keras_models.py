"""Small Keras models, healthy and buggy, for the Keras tests and the backend script."""

from __future__ import annotations

import keras
import numpy as np


def data(kind: str, seed: int = 0, n: int = 32):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    if kind == "mlp":
        return rng.standard_normal((n, 12)).astype("float32"), y
    if kind == "image":
        return rng.standard_normal((n, 8, 8, 1)).astype("float32"), y
    if kind == "seq":
        return rng.integers(0, 30, (n, 7)), y
    if kind == "rgb":
        return rng.standard_normal((n, 32, 32, 3)).astype("float32"), y
    raise ValueError(kind)


def compiled(model, loss=None):
    model.compile(
        optimizer="adam", loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def mlp():
    return compiled(
        keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dropout(0.2),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(4),
            ]
        )
    )


def cnn():
    return compiled(
        keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(6, 3, padding="same"),
                keras.layers.BatchNormalization(),
                keras.layers.Activation("relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Dropout(0.1),
                keras.layers.Flatten(),
                keras.layers.Dense(4),
            ]
        )
    )


def rnn(cell="lstm"):
    layer = keras.layers.LSTM if cell == "lstm" else keras.layers.GRU
    return compiled(
        keras.Sequential(
            [
                keras.Input((7,), dtype="int32"),
                keras.layers.Embedding(30, 8),
                layer(12),
                keras.layers.Dense(4),
            ]
        ),
        loss="sparse_categorical_crossentropy" if cell == "gru" else None,
    )


def attention():
    inp = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(30, 16)(inp)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, dropout=0.1)(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    out = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(h))
    return compiled(keras.Model(inp, out))


def mobilenet():
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3),
        weights=None,
        classes=4,
        include_preprocessing=False,
        minimalistic=True,
        alpha=0.75,
    )
    return compiled(base, loss="sparse_categorical_crossentropy")


def healthy():
    return [
        ("mlp", mlp, "mlp"),
        ("cnn", cnn, "image"),
        ("lstm", rnn, "seq"),
        ("gru", lambda: rnn("gru"), "seq"),
        ("attention", attention, "seq"),
    ]


def sigmoid_stack(depth=14):
    layers = [keras.Input((12,))]
    layers += [keras.layers.Dense(16, activation="sigmoid") for _ in range(depth - 1)]
    layers.append(keras.layers.Dense(4))
    return compiled(keras.Sequential(layers))


def exploding_stack(depth=8, gain=3.0):
    init = keras.initializers.RandomNormal(stddev=gain / 16**0.5, seed=0)
    layers = [keras.Input((12,))] + [
        keras.layers.Dense(16, kernel_initializer=init) for _ in range(depth)
    ]
    layers.append(keras.layers.Dense(4))
    m = keras.Sequential(layers)
    m.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return m
