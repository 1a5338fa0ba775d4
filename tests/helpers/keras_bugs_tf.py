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


# -- localization (issue 13): one planted backward bug per model, in a custom layer -----------------


def sample_norm(drop_term):
    """Per-sample normalisation over the last axis with a hand-written backward; ``drop_term``
    forgets the ``- x̂ · mean(g · x̂)`` term of the input gradient."""

    @tf.custom_gradient
    def fn(x):
        mean = tf.reduce_mean(x, -1, keepdims=True)
        var = tf.reduce_mean(tf.square(x - mean), -1, keepdims=True)
        inv = tf.math.rsqrt(var + 1e-5)
        xhat = (x - mean) * inv

        def grad(g):
            dx = g - tf.reduce_mean(g, -1, keepdims=True)
            if not drop_term:
                dx = dx - xhat * tf.reduce_mean(g * xhat, -1, keepdims=True)
            return dx * inv

        return xhat, grad

    return fn


class SampleNorm(keras.layers.Layer):
    """A normalisation layer with its own scale and shift; its backward may drop a term."""

    def __init__(self, drop_term=False, **kwargs):
        super().__init__(**kwargs)
        self.drop_term = drop_term

    def build(self, shape):
        self.gamma = self.add_weight(shape=(shape[-1],), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(shape[-1],), initializer="zeros", name="beta")

    def call(self, x):
        return sample_norm(self.drop_term)(x) * self.gamma + self.beta


def functional_bug(kind=None):
    """``first`` → ``act`` (ScaledGrad, ×0.9 backward when ``kind == "scaled"``) → ``norm``
    (SampleNorm, dropped term when ``kind == "norm"``) → dropout → ``head``."""
    inp = keras.Input((12,))
    h = keras.layers.Dense(16, name="first")(inp)
    h = ScaledGrad(0.9 if kind == "scaled" else 1.0, name="act")(h)
    h = keras.layers.Activation("tanh", name="tanh")(h)
    h = SampleNorm(drop_term=kind == "norm", name="norm")(h)
    h = keras.layers.Dropout(0.2, name="drop")(h)
    return compiled(keras.Model(inp, keras.layers.Dense(4, name="head")(h)))


class Block(keras.layers.Layer):
    """Dense → ScaledGrad: a nested custom layer."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(16, name="dense")
        self.act = ScaledGrad(scale, name="act")

    def call(self, x):
        return keras.ops.tanh(self.act(self.dense(x)))


class SubclassedBug(keras.Model):
    """A subclassed model whose nested ``block.act`` has a ×``scale`` backward."""

    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.block = Block(scale, name="block")
        self.drop = keras.layers.Dropout(0.1, name="drop")
        self.head = keras.layers.Dense(4, name="head")

    def call(self, x, training=False):
        return self.head(self.drop(self.block(x), training=training))


def subclassed_bug(scale=1.0):
    model = SubclassedBug(scale)
    model(tf.zeros((2, 12)))
    return compiled(model)


# -- probability heads (softmax / sigmoid at the end of the last layer): on TensorFlow Keras'
# -- crossentropy losses read the logits the activation attaches (`output._keras_logits`), so the
# -- head's output itself is off the gradient path.


class ScaledSoftmaxHead(keras.layers.Layer):
    """``softmax(x @ w)`` with a ×``scale`` backward on the logits (``None``: correct)."""

    def __init__(self, units, scale=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.fn = scaled_identity(scale) if scale is not None else tf.identity

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform")

    def call(self, x):
        return keras.activations.softmax(self.fn(x @ self.w))


def probability_head(kind):
    """A functional classifier on 12 features whose last layer, ``head``, ends in a probability:
    ``"softmax"`` (Dense, sparse CE), ``"scaled"`` (:class:`ScaledSoftmaxHead` ×0.9, sparse CE),
    ``"sigmoid"`` (Dense(1), binary CE)."""
    inp = keras.Input((12,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inp)
    if kind == "sigmoid":
        out = keras.layers.Dense(1, activation="sigmoid", name="head")(h)
        loss = "binary_crossentropy"
    else:
        head = (
            ScaledSoftmaxHead(4, 0.9, name="head")
            if kind == "scaled"
            else keras.layers.Dense(4, activation="softmax", name="head")
        )
        out = head(h)
        loss = "sparse_categorical_crossentropy"
    return compiled(keras.Model(inp, out), loss=loss)
