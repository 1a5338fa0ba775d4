"""gradwatch.keras.localize: a planted backward bug in a custom layer is named at that layer."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

pytest.importorskip("tensorflow")

import gradwatch
from gradwatch.keras import GradWatch, localize
from gradwatch.keras.localize import layer_tree
from tests.helpers.keras_bugs_tf import (
    buggy,
    functional_bug,
    probability_head,
    subclassed_bug,
    unclonable,
)
from tests.helpers.keras_models import data

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="localize runs on the TensorFlow backend"
)


def _batch():
    return data("mlp", seed=3, n=16)


@pytest.mark.parametrize(("kind", "culprit"), [("scaled", "act"), ("norm", "norm")])
def test_a_functional_models_buggy_layer_is_the_culprit(kind, culprit):
    keras.utils.set_random_seed(1)
    report = localize(functional_bug(kind), *_batch())
    assert report.culprits == (culprit,), str(report)
    assert report.result(culprit).verdict == "fail"
    assert report.result("head").verdict == "pass"
    assert "<- culprit" in str(report)


def test_the_messages_say_what_is_wrong():
    keras.utils.set_random_seed(1)
    scaled = localize(functional_bug("scaled"), *_batch())
    assert scaled.summary == (
        "the backward of act (ScaledGrad) is wrong: its input gradient is off by 10%"
    )
    norm = localize(functional_bug("norm"), *_batch())
    assert norm.result("norm").detail.startswith("its input gradient")
    assert "gamma" not in norm.result("norm").detail  # its own weights' gradients are right


def test_a_subclassed_models_nested_buggy_layer_is_the_culprit():
    keras.utils.set_random_seed(1)
    report = localize(subclassed_bug(0.9), *_batch())
    assert report.culprits == ("block.act",), str(report)
    # the block and the model fail too, but only because they contain the culprit
    assert report.result("block").verdict == "fail"
    assert report.result("<model>").verdict == "fail"


def test_a_layer_that_cuts_its_kernel_out_of_the_graph_is_the_culprit():
    keras.utils.set_random_seed(1)
    model, _, _ = buggy("stop_gradient")
    report = localize(model, *_batch())
    assert report.culprits == ("cut",), str(report)
    assert report.result("cut").detail.startswith("its kernel gradient is missing")


def test_a_bug_in_a_subclassed_models_own_call_makes_the_model_the_culprit():
    keras.utils.set_random_seed(1)
    report = localize(unclonable("subclassed", 0.9), *_batch())
    assert report.culprits == ("<model>",), str(report)
    assert "sublayers' weight gradient is off" in report.summary


@pytest.mark.parametrize("make", [lambda: functional_bug(None), lambda: subclassed_bug(1.0)])
def test_correct_models_have_no_culprit(make):
    keras.utils.set_random_seed(1)
    report = localize(make(), *_batch())
    assert report.culprit is None, str(report)
    assert {m.verdict for m in report.modules} == {"pass"}, str(report)


def test_layers_are_named_in_model_order_with_dropout_checked_on_its_mask():
    keras.utils.set_random_seed(1)
    model = functional_bug(None)
    assert [n for n, _ in layer_tree(model)] == [
        "<model>",
        "first",
        "act",
        "tanh",
        "norm",
        "drop",
        "head",
    ]
    report = localize(model, *_batch())
    assert report.result("drop").verdict == "pass"
    assert report.result("norm").calls == 1


def test_the_model_is_left_exactly_as_it_was():
    keras.utils.set_random_seed(1)
    model = functional_bug("scaled")
    before = [np.array(v.numpy()) for v in model.variables]
    policies = [layer.dtype_policy.name for layer in model.layers]
    localize(model, *_batch())
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.variables, strict=True))
    assert [layer.dtype_policy.name for layer in model.layers] == policies
    assert all("call" not in vars(layer) for layer in [model, *model.layers])


def test_the_report_is_json_and_include_selects_layers():
    keras.utils.set_random_seed(1)
    model = functional_bug("scaled")
    report = localize(model, *_batch(), include=r"^(act|head)$")
    assert isinstance(report, gradwatch.LocalizationReport)
    assert [m.name for m in report.modules] == ["act", "head"]
    assert json.loads(json.dumps(report.to_dict()))["culprit"] == "act"


def test_backends_without_autodiff_are_reported_as_unsupported(monkeypatch):
    model = functional_bug("scaled")
    monkeypatch.setattr(keras.backend, "backend", lambda: "openvino")
    report = localize(model, *_batch())
    assert report.culprit is None and report.modules == ()
    assert "unsupported on the openvino backend" in report.summary


def test_a_fit_with_the_bug_names_the_layer_in_its_events():
    keras.utils.set_random_seed(1)
    model = functional_bug("scaled")
    x, y = _batch()
    cb = GradWatch(check_every_n_steps=1, on_mismatch="ignore", enable_norms=False)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    mismatches = [e for e in cb.events if e.kind == "mismatch"]
    assert mismatches
    assert {e.module for e in mismatches} == {"act"}
    assert mismatches[0].message.startswith(
        "the backward of act (ScaledGrad) is wrong: its input gradient is off by 10%"
    )
    assert [r.culprit for r in cb.localizations] == ["act"]
    assert cb.reports[0].events[0].module == "act"


def test_over_max_check_memory_each_layer_is_checked_alone_and_a_too_large_one_skipped():
    keras.utils.set_random_seed(1)
    model = functional_bug("scaled")  # 2848 bytes of float64 weights; `first` alone 1664
    before = [np.array(v.numpy()) for v in model.variables]
    report = localize(model, *_batch(), max_check_memory=1000)
    assert report.culprits == ("act",), str(report)
    assert ("first", "too large to check alone (1664 bytes in float64)") in report.skipped
    assert "<model>" in dict(report.skipped)
    assert [m.name for m in report.modules] == ["act", "tanh", "norm", "drop", "head"]
    assert "checked layer by layer: calls recorded in float32" in report.notes[-1]
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.variables, strict=True))
    keras.utils.set_random_seed(1)
    correct = localize(functional_bug(None), *_batch(), max_check_memory=1000)
    assert correct.culprit is None and {m.verdict for m in correct.modules} == {"pass"}


def test_without_max_check_memory_the_free_memory_of_the_device_is_the_limit(monkeypatch):
    from gradwatch.keras import local_backends

    model = functional_bug("scaled")
    monkeypatch.setattr(local_backends, "available_ram", lambda: 1000)
    report = localize(model, *_batch())
    assert report.culprits == ("act",)
    assert "over the 1000 bytes of free memory the model's device reports" in report.notes[-1]
    monkeypatch.setattr(local_backends, "available_ram", lambda: None)  # unknown: no limit
    assert localize(model, *_batch()).result("<model>") is not None


_UNREACHED = "its output does not reach the loss"


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_a_probability_head_read_through_its_logits_is_checked(kind):
    # On TensorFlow the crossentropy losses read `output._keras_logits` (the activation's input),
    # so the head's output gets no cotangent; its logits do, and the head is checked on them.
    keras.utils.set_random_seed(1)
    x, y = _batch()
    if kind == "sigmoid":
        y = (y % 2).astype("float32")[:, None]
    report = localize(probability_head(kind), x, y)
    assert report.result("head") is not None, str(report)
    assert report.result("head").verdict == "pass", str(report)
    assert report.result("<model>").verdict == "pass", str(report)
    assert not [n for n, why in report.skipped if why == _UNREACHED], str(report)
    assert report.culprits == ()


def test_a_bug_inside_a_softmax_head_is_the_culprit():
    keras.utils.set_random_seed(1)
    model = probability_head("scaled")
    report = localize(model, *_batch())
    assert report.culprits == ("head",), str(report)
    checked = gradwatch.keras.check_gradients(model, *_batch(), mode="modules")
    assert checked.verdict == "fail", str(checked)
    assert [e.module for e in checked.events if e.kind == "mismatch"] == ["head"], str(checked)
