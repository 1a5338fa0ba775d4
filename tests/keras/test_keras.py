"""gradwatch.keras on the TensorFlow backend (torch/JAX backends: test_keras_backends.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from gradwatch import GradientCheckError, GradientHealthWarning  # noqa: E402
from gradwatch.keras import GradWatch, assert_gradients, check_gradients  # noqa: E402
from gradwatch.keras.checker import KerasChecker  # noqa: E402
from gradwatch.watch.watcher import HEALTH_BLOCK  # noqa: E402
from tests.helpers import keras_models as km  # noqa: E402
from tests.helpers.keras_bugs_tf import buggy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[2]


def state(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)).copy() for v in model.variables]


def opt_state(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)).copy() for v in model.optimizer.variables]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(
    ("name", "factory", "kind"), km.healthy(), ids=[h[0] for h in km.healthy()]
)
def test_healthy_models_never_fail(seed, name, factory, kind):
    keras.utils.set_random_seed(seed)
    model = factory()
    x, y = km.data(kind, seed)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # optimizer state exists
    before, before_opt = state(model), opt_state(model)
    report = check_gradients(model, x, y, seed=seed)
    assert report.verdict == "pass", f"{name}\n{report}"
    after = state(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(before_opt, opt_state(model), strict=True))


def test_keras_application_with_resolution_floor():
    keras.utils.set_random_seed(0)
    model = km.mobilenet()
    x, y = km.data("rgb", 0, n=8)
    report = check_gradients(model, x, y, num_params=48)
    assert report.verdict in ("pass", "inconclusive"), str(report)
    assert not report.failed


@pytest.mark.parametrize("kind", ["scaled", "sign", "stop_gradient"])
def test_injected_bugs_fail_in_every_seed(kind):
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        model, event_kind, param = buggy(kind)
        x, y = km.data("mlp", seed)
        report = check_gradients(model, x, y, seed=seed)
        assert report.verdict == "fail", str(report)
        assert any(e.kind == event_kind and e.param.endswith(param) for e in report.events), str(
            report
        )
    with pytest.raises(GradientCheckError):
        assert_gradients(model, x, y)


def test_twin_computes_the_loss_in_float64_even_for_string_losses():
    keras.utils.set_random_seed(0)
    model = km.rnn("gru")  # compiled with a string loss
    checker = KerasChecker(model)
    x, y = km.data("seq")
    report = checker.check(x, y)
    assert checker.loss_dtype == "float64"
    assert report.dtype == "float64" and report.verdict == "pass"
    assert not any("float32 resolution" in n for n in report.notes)


def test_compiled_check_does_not_retrace_for_new_coordinates_or_values():
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp")
    checker = KerasChecker(model)
    checker.check(x, y, sample_seed=1)
    traces = checker.traces
    model.fit(x, y, epochs=1, verbose=0)  # new values
    checker.check(x, y, sample_seed=2)  # new coordinates
    checker.check(*km.data("mlp", seed=5), sample_seed=3)  # new batch, same shapes
    assert traces >= 1 and checker.traces == traces


def test_uncompiled_model_without_loss_is_value_error():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="compile it"):
        check_gradients(model, np.ones((2, 3), "float32"), np.zeros((2, 2), "float32"))
    r = check_gradients(model, np.ones((2, 3), "float32"), np.zeros((2, 2), "float32"), loss="mse")
    assert r.verdict == "pass"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_params": 0}, "num_params"),
        ({"mode": "x"}, "mode must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        (
            {"include": "nothing"},
            r"include/exclude left no variable to check \(include=\['nothing'\]\)",
        ),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"include": 5}, "include must be a regular expression or a list of them, got 5"),
        ({"exclude": 5}, "exclude must be a regular expression or a list of them, got 5"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_gradients(km.mlp(), *km.data("mlp"), **kwargs)


# --- the callback ---------------------------------------------------------------------------------


def test_callback_healthy_run_logs_and_reports(tmp_path):
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp", n=128)
    cb = GradWatch(check_every_n_steps=3, log_dir=str(tmp_path), log_every_n_steps=1)
    hist = model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    assert cb.events == []
    assert [r.step for r in cb.reports] == [
        1,
        4,
        7,
        10,
        13,
        16,
    ]  # optimizer.iterations after update
    assert all(r.verdict == "pass" for r in cb.reports)
    assert "gradwatch_grad_norm" in hist.history and "gradwatch_rel_error" in hist.history
    from gradwatch.inspect import load

    (run,) = load(tmp_path)
    assert run.name == "gradwatch"
    assert sorted(run.norms["global"]) == list(range(1, 17))
    assert set(run.norms) >= {w.path for w in model.trainable_variables}


def test_callback_mismatch_event_halt_and_raise():
    x, y = km.data("mlp", n=256)
    keras.utils.set_random_seed(0)
    model, _, _ = buggy("scaled")
    cb = GradWatch(check_every_n_steps=4, on_mismatch="ignore")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert {e.kind for e in cb.events} == {"mismatch"} and [r.step for r in cb.reports] == [
        1,
        5,
        9,
        13,
    ]

    model, _, _ = buggy("sign")
    cb = GradWatch(check_every_n_steps=4, on_mismatch="halt")
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[cb], verbose=0)
    assert int(model.optimizer.iterations) == 1

    model, _, _ = buggy("stop_gradient")
    with pytest.raises(GradientCheckError, match="disconnected"):
        model.fit(
            x, y, batch_size=16, epochs=1, callbacks=[GradWatch(on_mismatch="raise")], verbose=0
        )
    assert not hasattr(model, "train_step") or "gradwatch" not in repr(
        model.__dict__.get("train_step")
    )


def test_callback_warns_by_default():
    model, _, _ = buggy("sign")
    with pytest.warns(GradientHealthWarning, match="mismatch"):
        model.fit(
            *km.data("mlp", n=32), batch_size=16, epochs=1, callbacks=[GradWatch()], verbose=0
        )


def test_a_keras_run_speaks_keras_not_torch():
    model, _, _ = buggy("stop_gradient")
    with pytest.warns(GradientHealthWarning, match="disconnected") as caught:
        model.fit(
            *km.data("mlp", n=32), batch_size=16, epochs=1, callbacks=[GradWatch()], verbose=0
        )
    (ours,) = [w for w in caught if "disconnected" in str(w.message)]
    text = str(ours.message)
    assert "ops.stop_gradient" in text and ".numpy()" in text
    assert not any(word in text for word in (".detach()", ".item()", ".data"))
    assert ours.filename == __file__  # attributed to the model.fit line


def test_probe_data_forms(tmp_path):
    x, y = km.data("mlp", n=64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    class Seq(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]

    for probe in ((x[:16], y[:16]), (x[:16], y[:16], np.ones(16, "float32")), ds, Seq()):
        model = km.mlp()
        cb = GradWatch(check_every_n_steps=2, data=probe)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
        assert [r.verdict for r in cb.reports] == ["pass", "pass"]


def test_probe_data_that_does_not_fit_is_value_error_at_train_begin():
    model = km.mlp()
    with pytest.raises(ValueError, match=r"expected inputs of shape \(None, 12\), got \(4, 7\)"):
        model.fit(
            *km.data("mlp"),
            epochs=1,
            verbose=0,
            callbacks=[GradWatch(data=(np.ones((4, 7), "float32"), np.zeros(4)))],
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"data": "x"},
            "data must be None or probe data: (x, y) or (x, y, sample_weight) arrays (or x "
            "alone), a tf.data.Dataset or a keras.utils.PyDataset; got 'x'",
        ),
        (
            {"data": (np.ones((2, 3)), "y")},
            "data must be None or probe data: (x, y) or (x, y, sample_weight) arrays (or x "
            "alone), a tf.data.Dataset or a keras.utils.PyDataset; got a tuple of (ndarray, str)",
        ),
        (
            {"data": (np.ones(2),) * 4},
            "data must be None or probe data: (x, y) or (x, y, sample_weight) arrays (or x "
            "alone), a tf.data.Dataset or a keras.utils.PyDataset; got a tuple of (ndarray, "
            "ndarray, ndarray, ndarray)",
        ),
        ({"log_dir": 5}, "log_dir must be a path (str or os.PathLike) or None, got 5"),
        ({"log_dir": ""}, "log_dir must be a path (str or os.PathLike) or None, got ''"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"include": 5}, "include must be a regular expression or a list of them, got 5"),
        (
            {"vanish_threshold": 2.0, "explode_threshold": 1.0},
            "vanish_threshold must be below explode_threshold, got vanish_threshold=2.0 and "
            "explode_threshold=1.0",
        ),
        (
            {"enable_checks": False, "enable_norms": False},
            "GradWatch would do nothing with enable_checks=False and enable_norms=False: remove "
            "the callback, or set enable_checks=True or enable_norms=True",
        ),
    ],
)
def test_configuration_errors_at_construction(kwargs, message):
    with pytest.raises(ValueError) as info:
        GradWatch(**kwargs)
    assert str(info.value) == message


def test_log_dir_without_tensorboard_names_the_extra_at_construction(monkeypatch, tmp_path):
    assert GradWatch(log_dir=tmp_path).log_dir == str(tmp_path)  # os.PathLike is a path
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError) as info:
        GradWatch(log_dir=str(tmp_path))
    assert info.value.name == "tensorboard"
    assert str(info.value) == (
        "log_dir asks for TensorBoard files, which need the tensorboard package: "
        'pip install "gradwatch[tensorboard]" (or pass log_dir=None)'
    )
    assert GradWatch(log_dir=None).log_dir is None  # no TensorBoard files, no package needed


def test_include_matching_no_variable_raises_at_train_begin():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="out")], name="tiny")
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    cb = GradWatch(include="conv", check_every_n_steps=1)
    with pytest.raises(ValueError) as info:
        model.fit(x, y, epochs=1, callbacks=[cb], verbose=0)
    assert str(info.value) == (
        "include/exclude left no variable to check (include=['conv']); the 2 trainable variables "
        "are ['tiny/out/kernel', 'tiny/out/bias']"
    )
    assert int(model.optimizer.iterations) == 0 and cb.reports == []  # before the first step
    cb = GradWatch(include="conv", enable_checks=False)  # the patterns only select what is checked
    model.fit(x, y, epochs=1, callbacks=[cb], verbose=0)


def test_include_on_a_model_built_during_fit_is_judged_at_the_first_check():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Sub()
    model.compile(optimizer="sgd", loss="mse")
    cb = GradWatch(include="conv", check_every_n_steps=1, on_mismatch="raise")
    with pytest.warns(GradientHealthWarning, match="include/exclude left no variable to check"):
        model.fit(
            np.ones((8, 3), "float32"),
            np.zeros((8, 2), "float32"),
            batch_size=4,
            callbacks=[cb],
            verbose=0,
        )
    assert cb.reports == []
    (event,) = cb.events  # an unchecked event at the first step, not a raise; once
    assert (event.step, event.kind) == (1, "unchecked")
    assert "model built during fit" in event.message and "include/exclude" in event.message


def test_a_second_fit_in_which_no_check_ran_ends_with_one_unchecked_event(tmp_path):
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp", n=64)
    path = tmp_path / "gw.jsonl"
    cb = GradWatch(check_every_n_steps=1000, on_mismatch="raise", jsonl_path=str(path))
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert [r.step for r in cb.reports] == [1] and cb.events == []  # the first step is checked
    # The optimizer's count goes on (steps 5..8): a period of 1000 puts none of them on the schedule.
    with pytest.warns(GradientHealthWarning, match="no gradient check ran"):
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert cb.reports == []
    (event,) = cb.events
    assert (event.step, event.kind) == (8, "unchecked")
    assert "4 optimizer steps" in event.message and "check_every_n_steps=4 or less" in event.message
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"]["kind"] for r in records if r["type"] == "event"] == ["unchecked"]


def test_a_batch_xla_cannot_keep_is_an_unchecked_event():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((None, 3)), keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)]
    )
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    x, y = np.random.rand(16, 4, 3).astype("float32"), np.zeros((16, 2), "float32")

    def rows():  # sequences of varying length: no fixed per-row shape to pad to
        for i in range(4):
            yield x[4 * i : 4 * i + 4, : 3 + i % 2], y[4 * i : 4 * i + 4]

    spec = (tf.TensorSpec((None, None, 3), tf.float32), tf.TensorSpec((None, 2), tf.float32))
    data = tf.data.Dataset.from_generator(rows, output_signature=spec)
    cb = GradWatch(check_every_n_steps=1, on_mismatch="raise")
    with pytest.warns(GradientHealthWarning, match="jit_compile=True") as caught:
        model.fit(data, epochs=1, callbacks=[cb], verbose=0)
    assert len([w for w in caught if "unchecked" in str(w.message)]) == 1
    assert cb.reports == []
    (event,) = cb.events
    assert event.kind == "unchecked" and "data=(x, y)" in event.message


def test_assert_gradients_raises_on_inconclusive_unless_allowed():
    keras.utils.set_random_seed(0)
    dead = keras.layers.Dense(
        2, activation="relu", bias_initializer=keras.initializers.Constant(-1e3)
    )
    model = keras.Sequential([keras.Input((3,)), dead])
    model.compile(optimizer="sgd", loss="mse")  # every ReLU is off: every gradient is exactly zero
    x, y = np.ones((4, 3), "float32"), np.ones((4, 2), "float32")
    with pytest.raises(GradientCheckError, match="inconclusive, so nothing was verified") as info:
        assert_gradients(model, x, y)
    assert info.value.report.verdict == "inconclusive"
    assert "zero" in str(info.value) and "allow_inconclusive=True" in str(info.value)
    report = assert_gradients(model, x, y, allow_inconclusive=True)
    assert report.verdict == "inconclusive"


def test_vanishing_and_exploding():
    keras.utils.set_random_seed(0)
    x, y = km.data("mlp", n=128)
    model = km.sigmoid_stack()
    cb = GradWatch(enable_checks=False, on_vanish="ignore")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    vanished = {e.param for e in cb.events if e.kind == "vanishing"}
    first = model.trainable_variables[0].path
    assert first in vanished and model.trainable_variables[-2].path not in vanished

    model = km.exploding_stack()
    cb = GradWatch(enable_checks=False, on_explode="halt")
    model.fit(x, y, batch_size=8, epochs=20, callbacks=[cb], verbose=0)
    assert {e.kind for e in cb.events} & {"exploding", "nonfinite"}
    assert int(model.optimizer.iterations) < 50


def test_second_fit_without_the_callback_is_untouched():
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp", n=64)
    cb = GradWatch(check_every_n_steps=1)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    checks = len(cb.reports)
    assert "train_step" not in model.__dict__ and "apply" not in model.optimizer.__dict__
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(cb.reports) == checks
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)  # and back on again
    # Each fit starts fresh (as EarlyStopping does); steps are the optimizer's, which go on.
    assert [r.step for r in cb.reports] == list(range(2 * checks + 1, 3 * checks + 1))


def test_embedding_gradients_give_finite_norms():
    keras.utils.set_random_seed(0)
    model = km.rnn()
    x, y = km.data("seq", n=64)
    hist = model.fit(
        x, y, batch_size=16, epochs=1, callbacks=[GradWatch(check_every_n_steps=2)], verbose=0
    )
    assert np.isfinite(hist.history["gradwatch_grad_norm"][-1])


def test_constructor_validation_and_config():
    with pytest.raises(ValueError, match="on_explode must be one of"):
        GradWatch(on_explode="boom")
    with pytest.raises(ValueError, match="check_every_n_steps"):
        GradWatch(check_every_n_steps=-1)
    config = GradWatch(num_params=8, log_dir="x").get_config()
    assert config["num_params"] == 8 and config["log_dir"] == "x"
    assert GradWatch(**{k: v for k, v in config.items() if k != "data"}).config.num_params == 8


@pytest.mark.slow
def test_weights_bit_identical_with_and_without_callback(tmp_path):
    """Process-wide op determinism: in a subprocess."""
    script = ROOT / "tests" / "scripts" / "keras_determinism.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["checks"] >= 3 and result["identical"], result


@pytest.mark.slow
def test_mirrored_strategy_same_verdicts_as_without(tmp_path):
    """Two logical CPU devices (a process-wide setting): in a subprocess."""
    out = tmp_path / "mirrored.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "keras_mirrored.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["plain"] == result["mirror"] == "pass"
    assert result["same_entries"] and result["rel"][0] == result["rel"][1]
    assert result["callback"] == ["pass", "pass"] and result["events"] == []
    assert result["norms"] and all(np.isfinite(result["norms"]))
    assert result["norm_steps"] == [1, 2, 3, 4]  # one row per step, not one per replica


def test_default_schedule_decisions_are_logged(tmp_path):
    keras.utils.set_random_seed(0)
    path = tmp_path / "gw.jsonl"
    cb = GradWatch(jsonl_path=str(path))
    km.mlp().fit(*km.data("mlp", n=64), batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    schedule = [r for r in records if r["type"] == "schedule"]
    assert schedule and schedule[0]["step"] == 1
    assert "max_overhead=0.02" in schedule[0]["text"] and "s of training" in schedule[0]["text"]


def test_inspect_reads_a_keras_run_with_events(tmp_path):
    from gradwatch.cli import main

    keras.utils.set_random_seed(0)
    model, _, _ = buggy("scaled")
    cb = GradWatch(check_every_n_steps=2, log_dir=str(tmp_path), on_mismatch="ignore")
    model.fit(*km.data("mlp", n=64), batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    proc = subprocess.run(
        [sys.executable, "-m", "gradwatch", "inspect", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["runs"] == ["gradwatch"]
    got = sorted((e["step"], e["kind"], e["param"], e["message"]) for e in doc["events"])
    assert got == sorted((e.step, e.kind, e.param, e.message) for e in cb.events) and got
    assert main(["inspect", str(tmp_path), "--exit-zero"]) == 0


# --- norms read from the device every HEALTH_BLOCK steps -------------------------------------------


def _norm_lines(path):
    lines = [json.loads(x) for x in Path(path).read_text().splitlines()]
    return [x for x in lines if x.get("type") == "norms"]


def test_norms_read_in_blocks_are_every_steps_own_norms(tmp_path):
    keras.utils.set_random_seed(0)
    model = km.compiled(
        keras.Sequential(
            [keras.Input((12,)), keras.layers.Dense(16, "tanh"), keras.layers.Dense(4)]
        ),
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=model.loss)
    x, y = km.data("mlp", n=16 * 37)
    weights = [np.array(w) for w in model.get_weights()]
    path = tmp_path / "gw.jsonl"
    cb = GradWatch(enable_checks=False, log_every_n_steps=1, jsonl_path=str(path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    rows = _norm_lines(path)
    assert [r["step"] for r in rows] == list(range(1, 38))  # 37 steps: two full blocks and a tail
    # Replay SGD by hand: every row holds the norms of that step's own gradients.
    replay = km.compiled(
        keras.Sequential(
            [keras.Input((12,)), keras.layers.Dense(16, "tanh"), keras.layers.Dense(4)]
        )
    )
    replay.set_weights(weights)
    for step in range(37):
        xb, yb = x[16 * step : 16 * (step + 1)], y[16 * step : 16 * (step + 1)]
        with tf.GradientTape() as tape:
            loss = replay.loss(yb, replay(xb, training=True))
        grads = tape.gradient(loss, replay.trainable_variables)
        want = [float(tf.norm(g)) for g in grads]  # model order, as the record's
        got = [rows[step]["values"][v.path] for v in model.trainable_variables]
        assert got == pytest.approx(want, rel=1e-5), step
        for v, g in zip(replay.trainable_variables, grads, strict=True):
            v.assign(v - 0.1 * g)


def test_nonfinite_gradients_skip_their_update_in_graph_and_halt_within_a_block():
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp", n=16 * 40)
    x[16 * 5 : 16 * 6] = np.nan  # the 6th batch
    cb = GradWatch(enable_checks=False)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert [(e.kind, e.step) for e in cb.events] == [("nonfinite", 6)]
    # The 6th update was skipped inside the graph; the healthy steps after it went on until the
    # host read the block (no per-step read on TensorFlow), then fit halted.
    assert all(np.isfinite(v.numpy()).all() for v in model.variables)
    assert all(np.isfinite(v.numpy()).all() for v in model.optimizer.variables)
    assert int(model.optimizer.iterations) == HEALTH_BLOCK - 1  # 16 steps, one update skipped


def test_warn_policy_applies_the_nonfinite_update_as_keras_would():
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp", n=16 * 8)
    x[16 * 2 : 16 * 3] = np.nan
    cb = GradWatch(enable_checks=False, on_nonfinite="warn")
    with pytest.warns(GradientHealthWarning):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    assert int(model.optimizer.iterations) == 8
    assert not all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


def test_steps_per_execution_labels_every_step_with_the_optimizer_iterations(tmp_path):
    keras.utils.set_random_seed(0)
    model = km.mlp()
    model.compile(optimizer="adam", loss=model.loss, steps_per_execution=4)
    x, y = km.data("mlp", n=16 * 12)
    path = tmp_path / "gw.jsonl"
    cb = GradWatch(enable_checks=False, log_every_n_steps=1, jsonl_path=str(path))
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    steps = [r["step"] for r in _norm_lines(path)]
    assert steps == list(range(1, 13))  # every step's own norms, as optimizer.iterations counts
    assert int(model.optimizer.iterations) == 12
