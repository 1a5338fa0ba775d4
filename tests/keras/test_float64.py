"""Keras checks in float64 without cloning (issue 11, items 6-7): subclassed models, layers
without get_config, function and lambda losses, custom train_step with loss_fn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("TensorFlow backend tests", allow_module_level=True)

from gradwatch import GradientCheckError  # noqa: E402
from gradwatch.keras import (  # noqa: E402
    GradWatch,
    _compat,
    assert_gradients,
    check_gradients,
)
from tests.helpers import keras_bugs_tf as kb  # noqa: E402
from tests.helpers import keras_models as km  # noqa: E402

KINDS = ["subclassed", "no_config", "lambda_loss", "function_loss"]


def state(model):
    """Every variable's value, every layer's policy, the compiled loss and floatx."""
    values = [np.array(v.numpy()).copy() for v in model.variables]
    policies = [layer._dtype_policy for layer in _compat.layers_of(model)]
    return values, policies, model._compile_loss, keras.config.floatx()


def same_state(a, b):
    return (
        len(a[0]) == len(b[0])
        and all(
            x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True)
        )
        and all(x is y for x, y in zip(a[1], b[1], strict=True))
        and a[2] is b[2]
        and a[3] == b[3]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_unclonable_models_are_checked_in_float64(kind):
    keras.utils.set_random_seed(0)
    model = kb.unclonable(kind)
    x, y = km.data("mlp")
    before = state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not be cloned" fallback warning
        report = check_gradients(model, x, y)
    assert report.dtype == "float64", str(report)
    assert report.verdict == "pass", str(report)
    assert report.max_rel_error < 1e-6, str(report)
    assert not report.notes, report.notes
    assert same_state(before, state(model))


@pytest.mark.parametrize("kind", KINDS)
def test_a_small_backward_bug_is_caught_in_float64(kind):
    keras.utils.set_random_seed(0)
    model = kb.unclonable(kind, scale=0.9)
    report = check_gradients(model, *km.data("mlp"))
    assert report.dtype == "float64" and report.verdict == "fail", str(report)
    assert any(e.kind == "mismatch" and "first/" in e.param for e in report.events), str(report)
    with pytest.raises(GradientCheckError):
        assert_gradients(model, *km.data("mlp"))


@pytest.mark.parametrize("scale", [None, 0.9])
def test_lambda_as_loss_argument(scale):
    keras.utils.set_random_seed(0)
    model = kb.unclonable("no_config", scale=scale)
    report = check_gradients(model, *km.data("mlp"), loss=lambda yt, yp: kb.one_hot_mse(yt, yp))
    assert report.dtype == "float64"
    assert report.verdict == ("pass" if scale is None else "fail"), str(report)


def test_multi_output_dict_loss_with_weights_and_custom_compute_loss():
    class Twice(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return 2.0 * super().compute_loss(x, y, y_pred, sample_weight, training=training)

    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    h = keras.layers.Dense(8, activation="tanh")(inp)
    model = Twice(
        inp, {"a": keras.layers.Dense(4, name="a")(h), "b": keras.layers.Dense(1, name="b")(h)}
    )
    model.compile(
        optimizer="adam",
        loss={
            "a": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "b": kb.one_hot_mse,
        },
        loss_weights={"a": 1.0, "b": 0.5},
    )
    x, y = km.data("mlp")
    ys = {"a": y, "b": np.zeros((len(y), 1), "float32")}
    report = check_gradients(model, x, ys)
    assert report.dtype == "float64" and report.verdict == "pass", str(report)


def test_training_is_bit_identical_with_checks_between_steps():
    x, y = km.data("mlp", n=64)
    weights = []
    for checking in (False, True):
        keras.utils.set_random_seed(0)
        model = kb.unclonable("subclassed")
        for i in range(3):
            model.train_on_batch(x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)])
            if checking:
                check_gradients(model, x[:16], y[:16])
        opt = [np.array(v.numpy()) for v in model.optimizer.variables]
        weights.append([np.array(v.numpy()) for v in model.variables] + opt)
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))


def gradwatch_warnings(record):
    return [str(w.message) for w in record if "gradwatch" in str(w.message).lower()]


@pytest.mark.parametrize("scale", [None, 0.9])
def test_custom_train_step_checked_through_loss_fn(scale):
    keras.utils.set_random_seed(0)
    model = kb.CustomStep(scale)
    model.compile(optimizer="adam")  # no compiled loss: train_step has its own
    x, y = km.data("mlp", n=64)
    cb = GradWatch(check_every_n_steps=2, loss_fn=kb.custom_step_loss, on_mismatch="ignore")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert [r.step for r in cb.reports] == [1, 3]
    assert all(r.dtype == "float64" for r in cb.reports)
    want = "pass" if scale is None else "fail"
    assert [r.verdict for r in cb.reports] == [want, want], [str(r) for r in cb.reports]
    assert not any("train_step" in m for m in gradwatch_warnings(record))
    assert "gradwatch_grad_norm" in history.history


def test_custom_train_step_with_probe_data_and_loss_fn():
    keras.utils.set_random_seed(0)
    model = kb.CustomStep(0.9)
    model.compile(optimizer="adam")
    x, y = km.data("mlp", n=32)
    cb = GradWatch(
        check_every_n_steps=1,
        loss_fn=kb.custom_step_loss,
        data=(x[:8], y[:8]),
        on_mismatch="ignore",
    )
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert [r.verdict for r in cb.reports] == ["fail", "fail"]


def test_custom_train_step_without_loss_fn_warns_once_naming_both():
    keras.utils.set_random_seed(0)
    model = kb.unclonable("custom_step")  # compiled with a loss; train_step ignores it
    x, y = km.data("mlp", n=64)
    cb = GradWatch(check_every_n_steps=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    messages = gradwatch_warnings(record)
    assert len(messages) == 1, messages
    assert "CustomStep overrides train_step" in messages[0]
    assert "compiled loss" in messages[0] and "loss_fn" in messages[0]
    assert [r.step for r in cb.reports] == [1, 3]  # the compiled loss is checked instead


def test_custom_train_step_without_any_loss_one_warning_and_norms_recorded(tmp_path):
    keras.utils.set_random_seed(0)
    model = kb.CustomStep()
    model.compile(optimizer="adam")
    x, y = km.data("mlp", n=64)
    cb = GradWatch(check_every_n_steps=2, jsonl_path=str(tmp_path / "g.jsonl"), log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    messages = gradwatch_warnings(record)
    assert len(messages) == 1 and "no gradient check can run" in messages[0], messages
    assert cb.reports == []
    assert len(history.history["gradwatch_grad_norm"]) == 1
    assert np.isfinite(history.history["gradwatch_grad_norm"][0])
    text = (tmp_path / "g.jsonl").read_text()
    assert "custom_step" in text and '"global"' in text  # per-tensor and global norm rows


def test_loss_fn_must_be_callable():
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        GradWatch(loss_fn="mse")
    assert GradWatch(loss_fn=kb.custom_step_loss).get_config()["loss_fn"] is None
