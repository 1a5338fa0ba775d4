"""The Keras private attributes behind gradwatch.keras._compat exist and mean what we read."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from gradwatch.keras import _compat  # noqa: E402


def test_optimizer_variables_pair_with_apply_without_variables():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    opt = keras.optimizers.SGD(0.1)
    opt.build(model.trainable_variables)
    assert hasattr(opt, "_trainable_variables"), (
        "Keras moved BaseOptimizer._trainable_variables: update keras/_compat.py"
    )
    got = _compat.optimizer_variables(opt)
    assert [v.path for v in got] == [v.path for v in model.trainable_variables]
    before = [np.array(v.numpy()) for v in got]
    opt.apply([keras.ops.ones(v.shape) for v in got])  # paired with that list, in order
    after = [np.array(v.numpy()) for v in got]
    assert all(np.allclose(b - a, 0.1) for a, b in zip(after, before, strict=True))
