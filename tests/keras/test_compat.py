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


def test_float64_result_types_maps_the_entry_and_puts_it_back():
    from keras.src.backend.common import dtypes

    before = dtypes.BIT64_TO_BIT32_DTYPE["float64"]
    assert before == ("float64" if keras.backend.backend() == "tensorflow" else "float32"), (
        "Keras changed BIT64_TO_BIT32_DTYPE: update keras/_compat.py"
    )
    with _compat.float64_result_types():
        assert keras.backend.result_type("float64", "float64") == "float64"
        assert keras.backend.result_type("float64", "float32") == "float64"
    assert dtypes.BIT64_TO_BIT32_DTYPE["float64"] == before
    with pytest.raises(RuntimeError), _compat.float64_result_types():
        raise RuntimeError
    assert dtypes.BIT64_TO_BIT32_DTYPE["float64"] == before


def test_loss_objects_compute_in_the_given_dtype_and_are_put_back():
    loss = keras.losses.MeanSquaredError()
    assert loss.dtype == "float32"
    with _compat.loss_objects_in("float64"):
        assert loss.dtype == "float64"
        out = loss(np.zeros((2, 3)), np.ones((2, 3)))
        assert keras.backend.standardize_dtype(out.dtype) == "float64"
    assert loss.dtype == "float32"
    assert "dtype" in vars(keras.losses.Loss)


def test_policy_compile_loss_and_layers_are_where_we_read_them():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    model.compile(loss="mse", loss_weights=0.5)
    assert [layer.name for layer in _compat.layers_of(model)][-1] == "d"
    layer = model.layers[0]
    old = _compat.swap_dtype_policy(layer, keras.dtype_policies.DTypePolicy("float64"))
    assert layer.compute_dtype == "float64" and layer.variable_dtype == "float64"
    assert _compat.swap_dtype_policy(layer, old).name == "float64"
    assert layer.compute_dtype == "float32"
    own = model._compile_loss
    assert _compat.compile_loss_weights(model) == 0.5
    assert _compat.swap_compile_loss(model, None) is own
    _compat.swap_compile_loss(model, own)
    with _compat.autocast_scope("float64"):
        assert layer.kernel.dtype == "float64"
    assert layer.kernel.dtype == "float32"
