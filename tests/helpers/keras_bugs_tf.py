"""Buggy Keras layers that need TensorFlow (tf.custom_gradient, tf.stop_gradient)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tests.helpers.keras_models import compiled


def scaled_identity(scale):
    @tf.custom_gradient
    def fn(x):
        def grad(g):
            return scale * g

        return tf.identity(x), grad

    return fn


class ScaledGrad(keras.layers.Layer):
    def __init__(self, scale=0.9, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.fn = scaled_identity(scale)

    def call(self, x):
        return self.fn(x)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


class StopGradDense(keras.layers.Dense):
    def call(self, x):
        return tf.matmul(x, tf.stop_gradient(self.kernel)) + self.bias


def buggy(kind):
    """(model, expected event kind, param path suffix)."""
    if kind == "stop_gradient":
        return (
            compiled(
                keras.Sequential(
                    [
                        keras.Input((12,)),
                        StopGradDense(16, name="cut"),
                        keras.layers.Activation("tanh"),
                        keras.layers.Dense(4, name="head"),
                    ]
                )
            ),
            "disconnected",
            "cut/kernel",
        )
    scale = {"scaled": 0.9, "sign": -1.0}[kind]
    return (
        compiled(
            keras.Sequential(
                [
                    keras.Input((12,)),
                    keras.layers.Dense(16, name="first"),
                    ScaledGrad(scale),
                    keras.layers.Activation("tanh"),
                    keras.layers.Dense(4, name="head"),
                ]
            )
        ),
        "mismatch",
        "first/kernel",
    )
