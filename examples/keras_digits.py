"""Keras 3: train a small classifier on scikit-learn's digits with GradWatch and TensorBoard.

GradWatch checks gradients on a float64 twin (first step, then every 20 steps here), logs
per-layer gradient norms beside Keras' own TensorBoard logs, and adds ``gradwatch_grad_norm`` and
``gradwatch_rel_error`` to the logs that History and the progress bar see. ``--bug`` inserts a layer
whose custom gradient is scaled by 0.9 (TensorFlow backend).

Run: python examples/keras_digits.py [--bug] [--logdir runs/keras_digits]
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
from sklearn.datasets import load_digits

from gradwatch.keras import GradWatch


class ScaledGradient(keras.layers.Layer):
    """Identity forward, gradient multiplied by ``scale`` backward: a 10% bug when scale=0.9."""

    def __init__(self, scale: float = 0.9, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):  # type: ignore[no-untyped-def]
        import tensorflow as tf

        @tf.custom_gradient
        def scaled(x):  # type: ignore[no-untyped-def]
            return tf.identity(x), lambda g: self.scale * g

        return scaled(x)

    def get_config(self) -> dict:  # a complete config lets gradwatch clone it in float64
        return {**super().get_config(), "scale": self.scale}


def build(bug: bool) -> keras.Model:
    layers = [keras.Input((64,)), keras.layers.Dense(64, name="hidden")]
    if bug:
        layers.append(ScaledGradient(0.9, name="scaled_gradient"))
    layers += [
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(10, name="head"),
    ]
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bug", action="store_true")
    ap.add_argument("--logdir", default="runs/keras_digits")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    watch = GradWatch(check_every_n_steps=20, log_dir=args.logdir, log_every_n_steps=5)
    tensorboard = keras.callbacks.TensorBoard(args.logdir, update_freq=5)
    hist = build(args.bug).fit(
        x, y, batch_size=64, epochs=args.epochs, callbacks=[watch, tensorboard], verbose=2
    )
    print(f"\nlast epoch: { ({k: round(float(v[-1]), 4) for k, v in hist.history.items()}) }")
    print(f"{len(watch.reports)} gradient checks, {len(watch.events)} events")
    print(watch.reports[-1])
    print(f"\nTensorBoard logs: {args.logdir}  (gradwatch inspect {args.logdir})")
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main()
