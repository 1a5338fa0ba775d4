"""Sinks: the protocol, each writer's records, and the round trip Watcher -> sink -> inspect.load."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch import CheckReport, EntryResult, GradientEvent
from gradwatch.inspect import load
from gradwatch.options import WatchConfig
from gradwatch.watch.sinks import JsonlSink, Sink, TensorBoardSink
from gradwatch.watch.watcher import Watcher

SHAPES = {"fc.weight": (4, 3), "fc.bias": (4,)}


def _report(step: int) -> CheckReport:
    results = (
        EntryResult("fc.weight", (0, 1), 1.0, 0.9, 0.1, "mismatch"),
        EntryResult("fc.bias", (2,), 0.5, 0.5, 1e-9, "ok"),
    )
    event = GradientEvent(step, "mismatch", "fc.weight", 0.1, 1e-3, "fc.weight is off by 10%")
    return CheckReport(step, "fail", 0.1, results, (event,), "coordinate", "float64", 1e-3, 5, 0.01)


def _run(sinks) -> Watcher:
    """A short run: 8 steps of norms (a NaN at step 6), one failing check at step 2."""
    w = Watcher(
        WatchConfig.create(log_every_n_steps=2, on_mismatch="ignore", on_nonfinite="ignore"),
        first_step=1,
    )
    w.open(sinks)
    w.start(SHAPES)
    for step in range(1, 9):
        bias = float("nan") if step == 6 else 0.5
        w.observe_norms(step, {"fc.weight": 1.0 + step, "fc.bias": bias})
        if step == 2:
            w.observe_report(_report(step), step, 0.01)
    w.flush_health()
    w.close()
    return w


def test_both_writers_are_sinks():
    assert isinstance(JsonlSink("x.jsonl"), Sink)
    assert isinstance(TensorBoardSink("x"), Sink)


@pytest.mark.parametrize("kind", ["jsonl", "tensorboard"])
def test_round_trip_through_each_sink_into_inspect(tmp_path, kind):
    sink = JsonlSink(tmp_path / "gw.jsonl") if kind == "jsonl" else TensorBoardSink(tmp_path)
    w = _run([sink])
    (run,) = load(tmp_path)
    # Norms on the logging steps (every 2nd), and step 6's because it has an event.
    assert sorted(run.norms["fc.weight"]) == [2, 4, 6, 8]
    assert run.norms["global"][4] == pytest.approx(math.hypot(5.0, 0.5))
    assert math.isnan(run.norms["fc.bias"][6])
    assert run.rel_errors["fc.weight"] == {2: pytest.approx(0.1)}  # TensorBoard keeps float32
    assert run.rel_errors["max"] == {2: pytest.approx(0.1)}
    assert [(e.step, e.kind, e.param) for e in run.events] == [
        (e.step, e.kind, e.param) for e in w.events
    ]
    assert {(e.step, e.kind) for e in run.events} == {(2, "mismatch"), (6, "nonfinite")}
    assert run.meta["shapes"] == {k: list(v) for k, v in SHAPES.items()}


def test_only_the_writer_writes(tmp_path):
    w = Watcher(WatchConfig.create(log_every_n_steps=1, jsonl_path=str(tmp_path / "gw.jsonl")))
    w.open([], writer=False)
    w.start(SHAPES)
    w.observe_norms(0, {"fc.weight": float("nan"), "fc.bias": 1.0})
    w.close()
    assert not (tmp_path / "gw.jsonl").exists()
    assert [e.kind for e in w.events] == ["nonfinite"]  # the record is kept all the same


def test_log_every_zero_writes_only_the_norms_of_steps_with_events(tmp_path):
    path = tmp_path / "gw.jsonl"
    w = Watcher(WatchConfig.create(jsonl_path=str(path), on_nonfinite="ignore"))
    w.open([], log_every=0)
    w.start(SHAPES)
    for step in range(5):
        w.observe_norms(step, {"fc.weight": 1.0, "fc.bias": float("nan") if step == 3 else 1.0})
    w.close()
    norms = [json.loads(x) for x in path.read_text().splitlines() if '"norms"' in x]
    assert [r["step"] for r in norms] == [3]


def test_jsonl_records_are_json_with_non_finite_numbers_as_strings(tmp_path):
    path = tmp_path / "gw.jsonl"
    sink = JsonlSink(path)
    sink.write_meta(0, {"shapes": {}})
    sink.write_norms(1, {"w": float("inf")}, float("inf"))
    sink.write_schedule(1, "next at 5")
    sink.close()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["type"] for r in records] == ["meta", "norms", "schedule"]
    assert records[1]["values"] == {"w": "inf"} and records[1]["global"] == "inf"


def test_tensorboard_sink_writes_nothing_until_the_first_record(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    sink.flush()
    sink.close()
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("first_step", [0, 1])
def test_sparse_observation_and_logging_periods_never_miss_each_other(first_step):
    w = Watcher(WatchConfig.create(norm_every_n_steps=10), first_step=first_step)
    w.open([], log_every=50)
    written = [s for s in range(first_step, first_step + 200) if w.observes(s) and w.writes(s)]
    # one write per logging period: the first observed step at or after each multiple of 50
    assert [w.count(s) for s in written] == [51, 101, 151]


def test_log_every_zero_is_accepted_and_negative_is_not():
    assert WatchConfig.create(log_every_n_steps=0).log_every_n_steps == 0
    with pytest.raises(ValueError, match="log_every_n_steps must be None"):
        WatchConfig.create(log_every_n_steps=-1)


def test_histograms_are_not_computed_when_no_sink_takes_them(tmp_path):
    w = Watcher(WatchConfig.create(log_every_n_steps=1))
    w.open([JsonlSink(tmp_path / "gw.jsonl")])
    calls = []
    w.write_histograms(0, lambda: calls.append(1) or {})
    assert calls == []
    w.open([TensorBoardSink(tmp_path / "tb")])
    w.write_histograms(0, lambda: calls.append(1) or {"w": [1.0, 2.0]})
    assert calls == [1]


# --- runs: ids in every record, event counts as scalars -------------------------------------------


def _jsonl_run(w: Watcher, first: int, bad_step: int) -> None:
    """One short run through ``w``: norms at every step, a NaN (a ``nonfinite`` event) at one."""
    w.open([])
    w.start(SHAPES)
    for step in range(first, first + 4):
        bias = float("nan") if step == bad_step else 0.5
        w.observe_norms(step, {"fc.weight": 1.0, "fc.bias": bias})
    w.flush_health()
    w.close()


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_jsonl_record_carries_the_run_id_and_each_fit_gets_a_new_one(tmp_path):
    path = tmp_path / "gw.jsonl"
    config = WatchConfig.create(log_every_n_steps=1, jsonl_path=str(path), on_nonfinite="ignore")
    w = Watcher(config)
    first = w.run
    _jsonl_run(w, 0, bad_step=2)
    records = _records(path)
    assert {r["type"] for r in records} == {"meta", "norms", "event"}
    assert records[0]["type"] == "meta" and all(r["run"] == first for r in records)
    assert len(first) == 12 and int(first, 16) >= 0

    w.reset()  # the next fit: a new run, a new id, a new meta record before its own records
    assert w.run != first
    _jsonl_run(w, 4, bad_step=5)
    second = [r for r in _records(path) if r["run"] != first]
    assert second[0]["type"] == "meta" and {r["run"] for r in second} == {w.run}
    assert [r["event"]["step"] for r in second if r["type"] == "event"] == [5]


def test_a_resumed_run_keeps_its_id_and_its_event_counts(tmp_path):
    path = tmp_path / "gw.jsonl"
    config = WatchConfig.create(log_every_n_steps=1, jsonl_path=str(path), on_nonfinite="ignore")
    w = Watcher(config)
    _jsonl_run(w, 0, bad_step=2)
    state = w.state_dict()

    resumed = Watcher(config)  # as a callback rebuilt from a checkpoint: reset, then restore
    assert resumed.run != w.run
    resumed.load_state_dict(state)
    assert resumed.run == w.run and resumed.event_counts == {"nonfinite": 1}
    _jsonl_run(resumed, 4, bad_step=5)
    assert {r["run"] for r in _records(path)} == {w.run}
    assert resumed.event_counts == {"nonfinite": 2}
    (run,) = load(path)  # one run, whose events come from both halves
    assert run.run_id == w.run and [e.step for e in run.events] == [2, 5]

    resumed.load_state_dict({"checks_done": 0})  # a 0.1 checkpoint: no id, the run keeps its own
    assert resumed.run == w.run


def test_event_counts_are_scalars_that_inspect_does_not_take_for_norms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = _run([TensorBoardSink(tmp_path)])  # events: mismatch at step 2, nonfinite at step 6
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    counts = {
        tag: [(t.step, float(t.tensor_proto.float_val[0])) for t in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
        if tag.startswith("gradwatch/events/")
    }
    assert counts == {
        "gradwatch/events/mismatch": [(2, 1.0)],
        "gradwatch/events/nonfinite": [(6, 1.0)],
    }
    assert w.event_counts == {"mismatch": 1, "nonfinite": 1}
    (run,) = load(tmp_path)
    assert set(run.norms) == {"fc.weight", "fc.bias", "global"}
    assert run.run_id == w.run and run.meta["run"] == w.run


def test_event_counts_run_on_across_steps_and_one_write_per_step(tmp_path):
    written = []

    class Counts(JsonlSink):
        def write_event_counts(self, step, counts):
            written.append((step, dict(counts)))

    w = Watcher(WatchConfig.create(on_nonfinite="ignore", on_explode="ignore"))
    w.open([Counts(tmp_path / "gw.jsonl")], log_every=0)
    w.start(SHAPES)
    w.observe_norms(0, {"fc.weight": float("nan"), "fc.bias": 1.0})
    w.observe_norms(1, {"fc.weight": 1.0, "fc.bias": 1.0})
    w.observe_norms(2, {"fc.weight": float("inf"), "fc.bias": 1.0})
    w.observe_norms(3, {"fc.weight": 1e9, "fc.bias": 1e9})  # two tensors explode at once
    w.flush_health()
    assert written == [(0, {"nonfinite": 1}), (2, {"nonfinite": 2}), (3, {"exploding": 2})]
    assert w.event_counts == {"nonfinite": 2, "exploding": 2}
