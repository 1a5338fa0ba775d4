"""gradwatch.keras.check_gradients(mode="modules"): each layer's own backward as the check."""

from __future__ import annotations

import keras
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from gradwatch import GradientCheckError
from gradwatch.keras import GradWatch, assert_gradients, check_gradients
from tests.helpers.keras_bugs_tf import functional_bug, subclassed_bug
from tests.helpers.keras_models import data

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="localize runs on the TensorFlow backend"
)


def _batch():
    return data("mlp", seed=3, n=16)


@pytest.mark.parametrize(
    ("make", "culprit"),
    [(lambda: functional_bug("scaled"), "act"), (lambda: subclassed_bug(0.9), "block.act")],
)
def test_a_buggy_layer_fails_the_check_with_one_event_naming_it(make, culprit):
    keras.utils.set_random_seed(1)
    report = check_gradients(make(), *_batch(), mode="modules")
    assert report.verdict == "fail" and report.mode == "modules", str(report)
    failing = [e for e in report.events if e.kind == "mismatch"]
    assert [e.module for e in failing] == [culprit], str(report)
    assert "its input gradient is off by 10%" in failing[0].message
    with pytest.raises(GradientCheckError, match=culprit):
        assert_gradients(make(), *_batch(), mode="modules")


def test_a_correct_model_passes_and_is_left_as_it_was():
    keras.utils.set_random_seed(1)
    model = functional_bug(None)
    before = [np.array(v.numpy()) for v in model.variables]
    report = check_gradients(model, *_batch(), mode="modules")
    assert report.verdict == "pass" and not report.events, str(report)
    assert {"act:input", "head.kernel"} <= set(report.params), report.params
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.variables, strict=True))


def test_over_max_check_memory_the_layers_are_checked_alone():
    keras.utils.set_random_seed(1)
    model = functional_bug("scaled")
    report = check_gradients(model, *_batch(), max_check_memory=64)
    assert report.mode == "modules", str(report)
    assert any("checked instead (as mode='modules')" in n for n in report.notes), report.notes
    assert any("too large to check alone" in n for n in report.notes), report.notes
    assert report.verdict == "fail" and {e.module for e in report.events} == {"act"}


def test_a_fit_in_mode_modules_names_the_layer():
    keras.utils.set_random_seed(1)
    model = functional_bug("scaled")
    x, y = _batch()
    cb = GradWatch(check_every_n_steps=1, mode="modules", on_mismatch="ignore", enable_norms=False)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert [r.mode for r in cb.reports] == ["modules"]
    assert {e.module for e in cb.events if e.kind == "mismatch"} == {"act"}
    assert cb.localizations == []  # the check named the layer itself


def test_include_selects_layers_by_path_in_mode_modules():
    keras.utils.set_random_seed(1)
    report = check_gradients(functional_bug("scaled"), *_batch(), mode="modules", include="^act$")
    assert report.params == ("act:input",), str(report)
    with pytest.raises(ValueError, match="left no layer to check"):
        check_gradients(functional_bug(None), *_batch(), mode="modules", include="nothing")


def test_over_max_check_memory_include_on_variable_paths_selects_their_layers():
    keras.utils.set_random_seed(1)
    model = functional_bug("scaled")
    report = check_gradients(model, *_batch(), max_check_memory=600, include="head/")
    assert {r.param.split(":")[0].split(".")[0] for r in report.results} == {"head"}, str(report)
    assert any("selected the layers holding those variables" in n for n in report.notes)
