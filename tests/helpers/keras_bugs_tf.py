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


# -- models that cannot be cloned (issue 11): each correct with scale=None, a x`scale` backward bug
# -- otherwise; the bug sits between the first layer and the loss, so `first`'s tensors mismatch.


class NoConfigDense(keras.layers.Layer):
    """A custom layer without ``get_config`` (clone_model cannot rebuild it)."""

    def __init__(self, units, scale=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.fn = scaled_identity(scale) if scale is not None else tf.identity

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform")
        self.b = self.add_weight(shape=(self.units,), initializer="zeros")

    def call(self, x):
        return self.fn(keras.ops.matmul(x, self.w) + self.b)

    def get_config(self):
        raise NotImplementedError("no config")


class Subclassed(keras.Model):
    """A subclassed model; ``train_step`` of its own when ``custom_step``."""

    def __init__(self, scale=None, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(16, name="first")
        self.head = keras.layers.Dense(4, name="head")
        self.fn = scaled_identity(scale) if scale is not None else tf.identity
        self.ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, x, training=False):
        return self.head(keras.ops.tanh(self.fn(self.first(x))))


class CustomStep(Subclassed):
    """Its own ``train_step``, with a loss object it holds (not the compiled loss)."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.ce(y, self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return {"loss": loss}


def custom_step_loss(model, data):
    """``loss_fn(model, data)`` for :class:`CustomStep`: what its ``train_step`` computes."""
    x, y = data
    return model.ce(y, model(x, training=True))


def one_hot_mse(y_true, y_pred):
    return keras.ops.mean(
        (y_pred - keras.ops.one_hot(keras.ops.cast(y_true, "int32"), 4)) ** 2, axis=-1
    )


def unclonable(kind, scale=None):
    """A compiled model of ``kind`` that clone_model cannot copy in float64."""
    if kind == "subclassed":
        model = Subclassed(scale)
        model(tf.zeros((2, 12)))
        return compiled(model)
    if kind == "custom_step":
        model = CustomStep(scale)
        model(tf.zeros((2, 12)))
        return compiled(model)
    first = keras.layers.Dense(16, name="first")
    if kind == "no_config":
        layers = [first, NoConfigDense(16, scale), keras.layers.Activation("tanh")]
        loss = None
    else:
        layers = [first, ScaledGrad(scale) if scale is not None else keras.layers.Identity()]
        layers.append(keras.layers.Activation("tanh"))
        loss = {
            "lambda_loss": lambda yt, yp: one_hot_mse(yt, yp),
            "function_loss": one_hot_mse,
        }[kind]
    model = keras.Sequential([keras.Input((12,)), *layers, keras.layers.Dense(4, name="head")])
    return compiled(model, loss=loss)
