import math

import pytest

from gradwatch.core.health import HealthMonitor, HealthThresholds, layer_prefix

SHAPES = {
    "0.weight": (8, 4),
    "0.bias": (8,),
    "1.weight": (8, 8),
    "1.bias": (8,),
    "2.weight": (2, 8),
    "2.bias": (2,),
}


def healthy(**over):
    base = dict.fromkeys(SHAPES, 1e-2)
    base.update(over)
    return base


def test_layer_prefix():
    assert layer_prefix("a.b.weight") == "a.b"
    assert layer_prefix("m/dense/kernel") == "m/dense"
    assert layer_prefix("scale") == ""


def test_healthy_stream_gives_no_events():
    mon = HealthMonitor(SHAPES, HealthThresholds())
    for step in range(50):
        assert mon.observe(step, healthy()) == []


def test_vanishing_needs_patience_and_is_one_episode():
    mon = HealthMonitor(SHAPES, HealthThresholds(patience=3))
    events = [mon.observe(s, healthy(**{"0.weight": 1e-9})) for s in range(6)]
    kinds = [[e.kind for e in ev] for ev in events]
    assert kinds == [[], [], ["vanishing"], [], [], []]
    e = events[2][0]
    assert (e.step, e.param, e.value) == (2, "0.weight", 1e-9)
    assert "0.weight" in e.message
    # Clears, then comes back: a second episode.
    mon.observe(6, healthy())
    again = [mon.observe(s, healthy(**{"0.weight": 1e-9})) for s in range(7, 10)]
    assert [e.kind for ev in again for e in ev] == ["vanishing"]


def test_relative_vanishing_against_layer_nearest_loss():
    mon = HealthMonitor(SHAPES, HealthThresholds(patience=1))
    # 1e-6 is above the absolute threshold but a millionth of the last layer's gradient.
    ev = mon.observe(0, healthy(**{"0.weight": 1e-6, "2.weight": 1.0}))
    assert [(e.kind, e.param) for e in ev] == [("vanishing", "0.weight")]
    # The same value next to a small last layer is fine.
    mon2 = HealthMonitor(SHAPES, HealthThresholds(patience=1))
    assert mon2.observe(0, healthy(**{"0.weight": 1e-6, "2.weight": 1e-5})) == []


def test_bias_of_a_healthy_layer_is_not_vanishing():
    mon = HealthMonitor(SHAPES, HealthThresholds(patience=1))
    for s in range(5):
        assert mon.observe(s, healthy(**{"1.bias": 1e-12})) == []


def test_structural_zero_from_first_step_is_exempt():
    shapes = {"w": (3, 3), "v": (3, 3), "head": (2, 3)}
    mon = HealthMonitor(shapes, HealthThresholds(patience=1))
    for s in range(5):
        assert mon.observe(s, {"w": 0.0, "v": 1e-2, "head": 1e-2}) == []
    # Once it moves it is judged like any other tensor.
    mon.observe(5, {"w": 1e-2, "v": 1e-2, "head": 1e-2})
    assert [e.kind for e in mon.observe(6, {"w": 1e-9, "v": 1e-2, "head": 1e-2})] == ["vanishing"]


def test_exploding_absolute_and_jump():
    mon = HealthMonitor(SHAPES, HealthThresholds())
    ev = mon.observe(0, healthy(**{"1.weight": 5e3}))
    assert [(e.kind, e.param, e.threshold) for e in ev] == [("exploding", "1.weight", 1e3)]
    assert mon.observe(1, healthy(**{"1.weight": 6e3})) == []  # same episode

    mon = HealthMonitor(SHAPES, HealthThresholds(min_history=5))
    for s in range(10):
        assert mon.observe(s, healthy(**{"1.weight": 1e-3})) == []
    ev = mon.observe(10, healthy(**{"1.weight": 5.0}))  # 5000x its own median, below 1e3
    assert [(e.kind, e.param) for e in ev] == [("exploding", "1.weight")]
    assert ev[0].threshold == pytest.approx(1.0)


def test_nonfinite_is_one_global_event_per_episode():
    mon = HealthMonitor(SHAPES, HealthThresholds())
    ev = mon.observe(3, healthy(**{"0.weight": math.nan, "1.weight": math.inf}))
    assert [(e.kind, e.param, e.value) for e in ev] == [("nonfinite", "global", 2.0)]
    assert "0.weight" in ev[0].message and "1.weight" in ev[0].message
    assert mon.observe(4, healthy(**{"0.weight": math.nan})) == []
    mon.observe(5, healthy())
    assert [e.kind for e in mon.observe(6, healthy(**{"2.bias": math.nan}))] == ["nonfinite"]


def test_state_dict_round_trip_keeps_patience():
    th = HealthThresholds(patience=3)
    a = HealthMonitor(SHAPES, th)
    for s in range(2):
        a.observe(s, healthy(**{"0.weight": 1e-9}))
    b = HealthMonitor(SHAPES, th)
    b.load_state_dict(a.state_dict())
    assert [e.kind for e in b.observe(2, healthy(**{"0.weight": 1e-9}))] == ["vanishing"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("patience", 0), ("vanish_threshold", -1.0), ("explode_threshold", math.inf), ("window", 1.5)],
)
def test_thresholds_validate(name, value):
    with pytest.raises(ValueError, match=name):
        HealthThresholds(**{name: value})


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_fast_path_gives_the_same_events_as_the_rules(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    names = list(SHAPES)
    fast = HealthMonitor(SHAPES, HealthThresholds(min_history=5, patience=2))
    slow = HealthMonitor(SHAPES, HealthThresholds(min_history=5, patience=2))
    slow._fast_ready = False
    quiet = fast._quiet
    taken = []

    def counting(rms):
        taken.append(quiet(rms))
        return taken[-1]

    fast._quiet = counting
    for step in range(300):
        values = dict(zip(names, (10 ** rng.uniform(-3, -1, len(names))).tolist(), strict=True))
        roll = rng.random()
        if roll < 0.03:
            values[names[rng.integers(len(names))]] = float("nan")
        elif roll < 0.06:
            values[names[rng.integers(len(names))]] = 10 ** rng.uniform(1, 4)  # spikes
        elif roll < 0.12:
            values["0.weight"] = 1e-9  # vanishing spells
        assert fast.observe(step, values) == slow.observe(step, values), step
    assert fast.state_dict() == slow.state_dict()
    assert sum(taken) > 100  # the fast path really ran


def _stream(rng, steps):
    """Healthy noise with NaN, spikes, vanishing spells and a structural zero that wakes up."""
    import numpy as np

    names = list(SHAPES)
    out = []
    spell, spell_left = "", 0
    for step in range(steps):
        values = dict(zip(names, (10 ** rng.uniform(-3, -1, len(names))).tolist(), strict=True))
        roll = rng.random()
        if roll < 0.005:
            values[names[rng.integers(len(names))]] = float("nan")
        elif roll < 0.01:
            values[names[rng.integers(len(names))]] = 10 ** rng.uniform(1, 4)
        elif roll < 0.02 and not spell_left:
            # 0.weight is caught relative to the layer nearest the loss; 2.weight (that layer
            # itself) only by the absolute threshold. Long spells fill whole blocks.
            spell, spell_left = str(rng.choice(["0.weight", "2.weight"])), int(rng.integers(1, 40))
        if spell_left:
            # Above the absolute threshold for 0.weight (only the ratio rule sees it), below it
            # for 2.weight.
            values[spell] = 2e-7 if spell == "0.weight" else 1e-9
            spell_left -= 1
        if step < 40 or rng.random() < 0.01:
            values["1.bias"] = 0.0
        out.append(np.fromiter(values.values(), dtype=np.float64))
    return names, np.array(out)


@pytest.mark.parametrize("seed", range(8))
def test_blocks_give_exactly_the_events_of_one_observation_at_a_time(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    names, rows = _stream(rng, 600)
    tiny = (rows < 1e-6).any(axis=1)
    th = HealthThresholds(min_history=5, patience=2, window=20)
    block = HealthMonitor(SHAPES, th)
    single = HealthMonitor(SHAPES, th)
    quiet_blocks = 0
    quiet = block._block_quiet

    def counting(b):
        nonlocal quiet_blocks
        ok = quiet(b)
        quiet_blocks += ok
        return ok

    block._block_quiet = counting
    got, want = [], []
    step = 0
    while step < len(rows):
        k = min(int(rng.integers(1, 17)), len(rows) - step)
        starts = [i for i in range(step + 1, step + k) if tiny[i] and not tiny[i - 1]]
        if starts and rng.random() < 0.7:  # often end a block right before a spell begins
            k = starts[0] - step
        got += block.observe_block(list(range(step, step + k)), names, rows[step : step + k])
        for s in range(step, min(step + k, len(rows))):
            want += single.observe(s, dict(zip(names, rows[s].tolist(), strict=True)))
        step += k
    assert got == want
    assert block.state_dict() == single.state_dict()
    assert quiet_blocks > 5  # whole blocks really went through the vectorised path


def test_block_of_names_in_another_order_goes_row_by_row():
    import numpy as np

    mon = HealthMonitor(SHAPES, HealthThresholds(patience=1))
    names = list(reversed(SHAPES))
    rows = np.full((3, len(names)), 1e-2)
    rows[2, names.index("0.weight")] = 1e-9
    events = mon.observe_block([0, 1, 2], names, rows)
    assert [(e.step, e.kind, e.param) for e in events] == [(2, "vanishing", "0.weight")]
