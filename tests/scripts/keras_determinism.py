"""Bit-identical Keras weights after fit with and without GradWatch (op determinism on)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import keras
import numpy as np
import tensorflow as tf

tf.config.experimental.enable_op_determinism()
from gradwatch.keras import GradWatch  # noqa: E402
from tests.helpers import keras_models as km  # noqa: E402


def run(with_cb):
    keras.utils.set_random_seed(7)
    model = km.mlp()
    x, y = km.data("mlp", n=128)
    cbs = [GradWatch(check_every_n_steps=5)] if with_cb else []
    hist = model.fit(x, y, batch_size=16, epochs=2, callbacks=cbs, verbose=0, shuffle=True)
    values = [np.array(v.numpy()) for v in model.variables + model.optimizer.variables]
    return values, hist.history["loss"], (len(cbs[0].reports) if cbs else 0)


a, loss_a, _ = run(False)
b, loss_b, checks = run(True)
identical = all(np.array_equal(u, w) for u, w in zip(a, b, strict=True)) and loss_a == loss_b
Path(sys.argv[1], "result.json").write_text(json.dumps({"identical": identical, "checks": checks}))
