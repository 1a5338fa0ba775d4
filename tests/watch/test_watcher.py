"""The Watcher judges norm observations in blocks: same events and steps, urgent ones at once."""

from __future__ import annotations

import math

import pytest

from gradwatch.watch import HEALTH_BLOCK, WatchConfig, Watcher

SHAPES = {"0.weight": (4, 4), "0.bias": (4,), "1.weight": (2, 4), "1.bias": (2,)}


def _watcher(**kw):
    w = Watcher(WatchConfig.create(**{"patience": 2, "on_vanish": "ignore", **kw}))
    w.start(SHAPES)
    return w


def _norms(**over):
    # RMS 1e-2 everywhere: norm = rms * sqrt(numel)
    out = {n: 1e-2 * math.sqrt(math.prod(s)) for n, s in SHAPES.items()}
    out.update(over)
    return out


def _faded(value=1e-9):
    """Layer 1 vanished as a whole (a weight alone next to a healthy bias is a structural zero)."""
    return _norms(**{"1.weight": value, "1.bias": value})


def test_nonfinite_is_judged_on_the_step_it_happens():
    w = _watcher()
    for step in range(3):
        assert w.observe_norms(step, _norms())[0] == []
    events, action = w.observe_norms(3, _norms(**{"0.bias": float("nan")}))
    assert [(e.step, e.kind) for e in events] == [(3, "nonfinite")]
    assert action.halt  # default on_nonfinite="halt", acted on at once


def test_absolute_explosion_is_judged_at_once():
    w = _watcher(on_explode="raise")
    events, action = w.observe_norms(0, _norms(**{"1.weight": 1e4 * math.sqrt(8)}))
    assert [(e.kind, e.param) for e in events] == [("exploding", "1.weight")]
    assert action.error is not None


def test_vanishing_waits_for_its_block_but_names_its_own_step():
    w = _watcher()
    got = []
    for step in range(HEALTH_BLOCK):
        got.append(w.observe_norms(step, _faded())[0])
    assert all(e == [] for e in got[:-1])  # nothing judged before the block is full
    assert [(e.step, e.kind, e.param) for e in got[-1]] == [(1, "vanishing", "1.weight")]


def test_flush_judges_a_partly_filled_block():
    w = _watcher(on_vanish="raise")
    for step in range(3):
        assert w.observe_norms(step, _faded())[0] == []
    events, action = w.flush_health()
    assert [(e.step, e.param) for e in events] == [(1, "1.weight")]
    assert action.error is not None
    assert w.flush_health()[0] == []  # nothing left


@pytest.mark.parametrize("cut", [1, 5, HEALTH_BLOCK - 1])
def test_rows_waiting_in_a_block_survive_a_checkpoint(cut):
    def run(resume_at):
        w = _watcher()
        seen = []
        for step in range(2 * HEALTH_BLOCK):
            if step == resume_at:
                state = w.state_dict()
                w = Watcher(WatchConfig.create(patience=2, on_vanish="ignore"))
                w.load_state_dict(state)
                w.start(SHAPES)
            norms = _faded() if step >= 2 else _norms()
            seen += w.observe_norms(step, norms)[0]
        return seen + w.flush_health()[0]

    assert run(cut) == run(-1)
    assert [(e.step, e.param) for e in run(cut)] == [(3, "1.weight")]


def test_a_norm_hovering_at_the_threshold_through_the_watcher_is_one_episode():
    w = _watcher(patience=3)
    events = []
    for step in range(100):
        rms = 1.2e-7 if step % 4 == 3 else 0.8e-7  # crosses the absolute threshold 50 times
        events += w.observe_norms(step, _faded(rms * math.sqrt(8)))[0]
    events += w.flush_health()[0]
    assert [(e.step, e.kind, e.param) for e in events] == [(2, "vanishing", "1.weight")]


def test_weight_norms_switch_on_the_relative_rule_and_zero_labels_exempt():
    from gradwatch.report import CheckReport, EntryResult

    w = _watcher(patience=1)
    w.observe_weight_norms({n: 10.0 * math.sqrt(math.prod(s)) for n, s in SHAPES.items()})
    # ‖g‖/‖w‖ of layer 0 at 1e-6 of the others' (1e-3): relative vanishing, RMS above 1e-7.
    events = w.observe_norms(0, _norms(**{"0.weight": 1e-8 * 4, "0.bias": 1e-8 * 2}))[0]
    events += w.flush_health()[0]
    assert [(e.kind, e.param) for e in events] == [("vanishing", "0.weight")]
    # 1.weight at RMS 5e-8, its bias at 1e-5 (not rounding level): vanishing unless a check
    # labelled its entries zero.
    small = _norms(**{"1.weight": 5e-8 * math.sqrt(8), "1.bias": 1e-5 * math.sqrt(2)})
    other = _watcher(patience=1)
    assert [e.param for e in other.observe_norms(0, small)[0] + other.flush_health()[0]] == [
        "1.weight"
    ]
    zero = EntryResult("1.weight", (0, 0), 0.0, 0.0, None, "zero")
    report = CheckReport(1, "pass", None, (zero,), (), "coordinate", "float64", 1e-5, 2, 0.0)
    w.observe_report(report, 1, 0.0)
    assert w.observe_norms(2, small)[0] + w.flush_health()[0] == []
