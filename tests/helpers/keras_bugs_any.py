"""Buggy Keras layers for every backend (keras.ops.custom_gradient, keras.ops.stop_gradient), for
localization on the TensorFlow, torch and JAX backends."""

from __future__ import annotations

import keras
import numpy as np

from tests.helpers.keras_models import compiled


def scaled_tanh(scale):
    """``tanh`` whose backward is ``scale`` times the true one (a x0.9 bug for ``scale=0.9``)."""

    @keras.ops.custom_gradient
    def fn(x):
        y = keras.ops.tanh(x)

        def grad(*args, upstream=None):  # torch calls grad(x, upstream=g), the others grad(g)
            if upstream is None:
                (upstream,) = args
            return upstream * scale * (1.0 - keras.ops.square(y))

        return y, grad

    return fn


class ScaledTanh(keras.layers.Layer):
    def __init__(self, scale=0.9, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.fn = scaled_tanh(scale)

    def call(self, x):
        return self.fn(x)


class CutDense(keras.layers.Dense):
    """A Dense layer whose kernel reaches the output through ``keras.ops.stop_gradient``."""

    def call(self, x):
        return keras.ops.matmul(x, keras.ops.stop_gradient(self.kernel)) + self.bias


def functional(kind=None):
    """``first`` → ``act`` (x0.9 backward when ``kind == "scaled"``) → ``bn`` → ``drop`` →
    ``head``; ``kind == "cut"``: ``first`` is a :class:`CutDense`."""
    inp = keras.Input((12,))
    dense = CutDense if kind == "cut" else keras.layers.Dense
    h = dense(16, name="first")(inp)
    h = ScaledTanh(0.9 if kind == "scaled" else 1.0, name="act")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dropout(0.2, name="drop")(h)
    return compiled(keras.Model(inp, keras.layers.Dense(4, name="head")(h)))


class Block(keras.layers.Layer):
    def __init__(self, kind, **kwargs):
        super().__init__(**kwargs)
        dense = CutDense if kind == "cut" else keras.layers.Dense
        self.dense = dense(16, name="dense")
        self.act = ScaledTanh(0.9 if kind == "scaled" else 1.0, name="act")

    def call(self, x):
        return self.act(self.dense(x))


class Subclassed(keras.Model):
    """``block`` (``block.dense`` → ``block.act``) → ``drop`` → ``head``."""

    def __init__(self, kind=None, **kwargs):
        super().__init__(**kwargs)
        self.block = Block(kind, name="block")
        self.drop = keras.layers.Dropout(0.1, name="drop")
        self.head = keras.layers.Dense(4, name="head")

    def call(self, x, training=False):
        return self.head(self.drop(self.block(x), training=training))


def subclassed(kind=None):
    model = Subclassed(kind)
    model(np.zeros((2, 12), "float32"))
    return compiled(model)


#: name → (model factory, the expected culprit).
CASES = {
    "functional_scaled": (lambda: functional("scaled"), "act"),
    "functional_cut": (lambda: functional("cut"), "first"),
    "functional_correct": (lambda: functional(None), None),
    "subclassed_scaled": (lambda: subclassed("scaled"), "block.act"),
    "subclassed_cut": (lambda: subclassed("cut"), "block.dense"),
    "subclassed_correct": (lambda: subclassed(None), None),
}
