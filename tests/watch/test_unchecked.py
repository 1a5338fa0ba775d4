"""``unchecked``: a check that could not run is an event in every sink, never a halt or a raise."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from gradwatch import CheckReport, GradientHealthWarning
from gradwatch.cli import main
from gradwatch.core.unchecked import unchecked_event
from gradwatch.inspect import load
from gradwatch.options import WatchConfig
from gradwatch.watch.sinks import JsonlSink, TensorBoardSink
from gradwatch.watch.watcher import Watcher

SHAPES = {"fc.weight": (4, 3), "fc.bias": (4,)}
STRICT = {
    "on_mismatch": "raise",
    "on_vanish": "raise",
    "on_explode": "raise",
    "on_nonfinite": "raise",
}


def _watcher(sinks=(), **kw) -> Watcher:
    w = Watcher(WatchConfig.create(**{**STRICT, **kw}), first_step=0)
    w.open(list(sinks), log_every=1)
    w.start(SHAPES)
    return w


def test_unchecked_warns_once_per_reason_and_never_halts_or_raises():
    w = _watcher()
    with pytest.warns(GradientHealthWarning, match="unchecked: the batch holds a Foo") as caught:
        action = w.unchecked(3, "batch:Foo", "the batch holds a Foo: pass loss_fn=...")
        again = w.unchecked(4, "batch:Foo", "the batch holds a Foo: pass loss_fn=...")
    assert len(caught) == 1
    assert not action.halt and action.error is None and not again.halt and again.error is None
    assert [(e.step, e.kind, e.param) for e in w.events] == [(3, "unchecked", "global")]
    assert w.event_counts == {"unchecked": 1}


def test_ignore_everywhere_still_warns_about_unchecked():
    w = _watcher(on_mismatch="ignore", on_vanish="ignore", on_explode="ignore")
    with pytest.warns(GradientHealthWarning, match="unchecked"):
        w.unchecked(0, "why", "nothing to check: do this")


def test_disable_checks_is_an_unchecked_event_with_reason_and_fix():
    w = _watcher()
    with pytest.warns(GradientHealthWarning, match="checks are switched off"):
        action = w.disable_checks(5, "RuntimeError: boom", "pass loss_fn=...")
    assert not w.checks_on and action.error is None and not action.halt
    (event,) = w.events
    assert event.kind == "unchecked" and event.step == 5
    assert "RuntimeError: boom" in event.message and event.message.endswith("pass loss_fn=...")


def test_unchecked_events_of_reports_warn_once_per_reason_but_are_all_recorded():
    w = _watcher()

    def report(step: int) -> CheckReport:
        event = unchecked_event(step, f"the loss at step {step} is float32: compute it in float64")
        return CheckReport(
            step, "inconclusive", None, (), (event,), "coordinate", "float64", 1e-3, 1, 0.0
        )

    with pytest.warns(GradientHealthWarning) as caught:
        for step in (0, 10, 20):
            action = w.observe_report(report(step), step, 0.0)
            assert action.error is None and not action.halt
    assert len([c for c in caught if "unchecked" in str(c.message)]) == 1
    assert [e.step for e in w.events] == [0, 10, 20]
    assert w.finish_checks(20).error is None and len(w.events) == 3  # checks ran: nothing more


def _run_without_a_check(w: Watcher, first: int = 500, steps: int = 10) -> None:
    """A resumed run at steps 500..509 with check_every_n_steps=1000: no step is due."""
    for step in range(first, first + steps):
        w.observe_norms(step, {"fc.weight": 1.0, "fc.bias": 1.0})
        assert not w.check_due(step)
        w.record_step(0.01)
    w.flush_health()


def test_a_run_in_which_no_check_ran_ends_with_one_unchecked_event():
    w = _watcher(check_every_n_steps=1000)
    _run_without_a_check(w)
    with pytest.warns(GradientHealthWarning, match="no gradient check ran"):
        action = w.finish_checks(509)
    assert action.error is None and not action.halt
    (event,) = w.events
    assert (event.step, event.kind) == (509, "unchecked")
    assert (
        "10 optimizer steps" in event.message and "check_every_n_steps=10 or less" in event.message
    )
    assert w.finish_checks(509).error is None and len(w.events) == 1  # once


def test_no_end_event_when_a_check_ran_checks_are_off_or_a_reason_was_given():
    w = _watcher()
    w.observe_report(
        CheckReport(0, "pass", 0.0, (), (), "coordinate", "float64", 1e-3, 1, 0.0), 0, 0.0
    )
    _run_without_a_check(w, first=1, steps=0)
    w.finish_checks(9)
    assert w.events == []

    off = _watcher(enable_checks=False)
    _run_without_a_check(off)
    off.finish_checks(509)
    assert off.events == []

    told = _watcher(check_every_n_steps=1000)
    with pytest.warns(GradientHealthWarning):
        told.unchecked(500, "none", "training_step returned None: return the loss")
    _run_without_a_check(told)
    told.finish_checks(509)
    assert [e.message for e in told.events] == ["training_step returned None: return the loss"]

    idle = _watcher(check_every_n_steps=1000)  # no optimizer step at all: nothing unverified
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idle.finish_checks(0)
    assert idle.events == []


@pytest.mark.parametrize("kind", ["jsonl", "tensorboard"])
def test_unchecked_reaches_every_sink_and_inspect_exits_1(tmp_path, kind, capsys):
    sink = JsonlSink(tmp_path / "gw.jsonl") if kind == "jsonl" else TensorBoardSink(tmp_path)
    w = _watcher([sink], check_every_n_steps=1000)
    _run_without_a_check(w, first=500, steps=3)
    with pytest.warns(GradientHealthWarning):
        w.finish_checks(502)
    w.close()
    (run,) = load(tmp_path)
    (event,) = run.events
    assert (event.step, event.kind, event.param) == (502, "unchecked", "global")
    assert "no gradient check ran" in event.message and math.isnan(event.value)
    assert main(["inspect", str(tmp_path)]) == 1  # never reported as clean
    assert "unchecked" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [e["kind"] for e in doc["events"]] == ["unchecked"]


def test_a_run_with_only_an_unchecked_event_is_not_clean_for_inspect(tmp_path, capsys):
    w = _watcher([JsonlSink(tmp_path / "gw.jsonl")])
    with pytest.warns(GradientHealthWarning):
        w.unchecked(0, "sharded", "checks are off under FSDPStrategy: check the model unsharded")
    w.close()
    assert main(["inspect", str(tmp_path)]) == 1
    assert main(["inspect", str(tmp_path), "--exit-zero"]) == 0


def test_unchecked_event_count_is_a_scalar_for_loggers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = _watcher([TensorBoardSink(tmp_path)])
    with pytest.warns(GradientHealthWarning):
        w.unchecked(2, "none", "training_step returned None: return the loss")
    w.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    values = [
        (t.step, float(t.tensor_proto.float_val[0]))
        for t in acc.Tensors("gradwatch/events/unchecked")
    ]
    assert values == [(2, 1.0)]
