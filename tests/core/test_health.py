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


def faded(layer, value, **over):
    """A whole layer's gradients at ``value`` (as in a real vanishing: weight and bias together)."""
    return healthy(**{f"{layer}.weight": value, f"{layer}.bias": value, **over})


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
    events = [mon.observe(s, faded(0, 1e-9)) for s in range(6)]
    kinds = [[e.kind for e in ev] for ev in events]
    assert kinds == [[], [], ["vanishing"], [], [], []]
    e = events[2][0]
    assert (e.step, e.param, e.value) == (2, "0.weight", 1e-9)
    assert "0.weight" in e.message
    # Clears, then comes back: a second episode.
    mon.observe(6, healthy())
    again = [mon.observe(s, faded(0, 1e-9)) for s in range(7, 10)]
    assert [e.kind for ev in again for e in ev] == ["vanishing"]


def test_first_last_ratio_without_weight_norms():
    mon = HealthMonitor(SHAPES, HealthThresholds(patience=1))
    # 1e-6 is above the absolute threshold but a millionth of the last layer's gradient.
    ev = mon.observe(0, faded(0, 1e-6, **{"2.weight": 1.0}))
    assert [(e.kind, e.param) for e in ev] == [("vanishing", "0.weight")]
    assert "that of 2.weight" in ev[0].message
    # The same value next to a small last layer is fine.
    mon2 = HealthMonitor(SHAPES, HealthThresholds(patience=1))
    assert mon2.observe(0, faded(0, 1e-6, **{"2.weight": 1e-5})) == []
    # With weight norms known the relative rule replaces it.
    mon3 = HealthMonitor(SHAPES, HealthThresholds(patience=1))
    mon3.observe_weights(dict.fromkeys(SHAPES, 1.0))
    assert mon3.observe(0, faded(0, 1e-6, **{"2.weight": 1.0})) == []


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
        a.observe(s, faded(0, 1e-9))
    a.observe_weights({"1.weight": 3.0})
    a.mark_zero({"2.bias": True})
    b = HealthMonitor(SHAPES, th)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert [e.kind for e in b.observe(2, faded(0, 1e-9))] == ["vanishing"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("patience", 0), ("vanish_threshold", -1.0), ("explode_threshold", math.inf), ("window", 1.5)],
)
def test_thresholds_validate(name, value):
    with pytest.raises(ValueError, match=name):
        HealthThresholds(**{name: value})


@pytest.mark.parametrize("weights", [False, True], ids=["first-last", "relative"])
@pytest.mark.parametrize("seed", range(6))
def test_vectorised_fast_path_gives_the_same_events_as_the_rules(seed, weights):
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
        if weights and step % 16 == 0:
            norms = dict(zip(names, (10 ** rng.uniform(-1, 4, len(names))).tolist(), strict=True))
            fast.observe_weights(norms)
            slow.observe_weights(norms)
        values = dict(zip(names, (10 ** rng.uniform(-3, -1, len(names))).tolist(), strict=True))
        roll = rng.random()
        if roll < 0.03:
            values[names[rng.integers(len(names))]] = float("nan")
        elif roll < 0.06:
            values[names[rng.integers(len(names))]] = 10 ** rng.uniform(1, 4)  # spikes
        elif roll < 0.12:
            values["0.weight"] = values["0.bias"] = 1e-9  # vanishing spells
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
            values[spell.replace("weight", "bias")] = values[spell]
            spell_left -= 1
        if step < 40 or rng.random() < 0.01:
            values["1.bias"] = 0.0
        out.append(np.fromiter(values.values(), dtype=np.float64))
    return names, np.array(out)


@pytest.mark.parametrize("weights", [False, True], ids=["first-last", "relative"])
@pytest.mark.parametrize("seed", range(6))
def test_blocks_give_exactly_the_events_of_one_observation_at_a_time(seed, weights):
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
        if weights:  # weight norms arrive between blocks, a check's zero labels too
            norms = dict(zip(names, (10 ** rng.uniform(-1, 3, len(names))).tolist(), strict=True))
            zero = {"2.weight": bool(rng.random() < 0.5)}
            for mon in (block, single):
                mon.observe_weights(norms)
                mon.mark_zero(zero)
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
    rows[2, names.index("0.weight")] = rows[2, names.index("0.bias")] = 1e-9
    events = mon.observe_block([0, 1, 2], names, rows)
    assert [(e.step, e.kind, e.param) for e in events] == [(2, "vanishing", "0.weight")]


def test_a_value_hovering_at_a_threshold_is_one_episode():
    # Three observations just below the absolute threshold, one just above, for 100 steps:
    # 0.1 ended the episode at each crossing and warned 25 times.
    mon = HealthMonitor(SHAPES, HealthThresholds(patience=3))
    events = []
    for step in range(100):
        value = 1.2e-7 if step % 4 == 3 else 0.8e-7
        events += mon.observe(step, faded(2, value))  # the reference: the absolute rule only
    assert [(e.step, e.kind, e.param) for e in events] == [(2, "vanishing", "2.weight")]
    # Back above twice the threshold ends it; the next spell is a new episode.
    mon.observe(100, faded(2, 3e-7))
    again = [e for s in range(101, 104) for e in mon.observe(s, faded(2, 0.8e-7))]
    assert [e.param for e in again] == ["2.weight"]


def test_an_exploding_value_hovering_at_its_threshold_is_one_episode():
    mon = HealthMonitor(SHAPES, HealthThresholds())
    values = [1.1e3, 0.9e3, 1.2e3, 0.8e3, 1.5e3]
    events = [e for s, v in enumerate(values) for e in mon.observe(s, healthy(**{"1.weight": v}))]
    assert [(e.step, e.kind) for e in events] == [(0, "exploding")]
    mon.observe(5, healthy(**{"1.weight": 400.0}))  # below half the threshold: ended
    assert [e.kind for e in mon.observe(6, healthy(**{"1.weight": 2e3}))] == ["exploding"]


RELATIVE = {
    "embed.weight": (50, 8),
    "attn.query.kernel": (8, 2, 4),
    "attn.key.kernel": (8, 2, 4),
    "attn.key.bias": (2, 4),
    "dense.kernel": (8, 8),
    "dense.bias": (8,),
    "head.kernel": (8, 4),
}


def _relative(**over):
    """Gradient RMS for weight RMS 1 everywhere: ‖g‖/‖w‖ is the value (0.1 unless given)."""
    out = dict.fromkeys(RELATIVE, 0.1)
    out.update(over)
    return out


def _weights(mon):
    mon.observe_weights({n: math.sqrt(math.prod(s)) for n, s in RELATIVE.items()})


def test_relative_rule_judges_gradient_against_weight_scale_and_the_median():
    mon = HealthMonitor(RELATIVE, HealthThresholds(patience=3))
    _weights(mon)
    # Attention kernels at 2e-4 of the median (measured on a learning Keras encoder): quiet.
    quiet = [mon.observe(s, _relative(**{"attn.query.kernel": 2e-5})) for s in range(5)]
    assert quiet == [[]] * 5
    # At 5e-6 of the median (below 1e-5 of it, above the absolute threshold): flagged on the
    # third observation, once.
    faded_query = {"attn.query.kernel": 5e-7}
    events = [e for s in range(5, 10) for e in mon.observe(s, _relative(**faded_query))]
    assert [(e.step, e.param) for e in events] == [(7, "attn.query.kernel")]
    assert events[0].value > 1e-7  # the absolute rule alone would not see it
    assert events[0].threshold == pytest.approx(1e-6)
    assert "median over the model's weight tensors" in events[0].message


def test_rounding_level_gradient_next_to_a_healthy_neighbour_is_exempt_whatever_its_rank():
    # Keras MultiHeadAttention's key bias (2-D): its true gradient is zero, its float32 one at
    # 1e-7..1e-6 of the key kernel's.
    mon = HealthMonitor(RELATIVE, HealthThresholds(patience=1))
    _weights(mon)
    for s in range(5):
        assert mon.observe(s, _relative(**{"attn.key.bias": 1e-8})) == []
    # Without a healthy neighbour (the kernel vanished too) the bias is judged.
    both = {"attn.key.bias": 1e-8, "attn.key.kernel": 1e-8}
    assert {e.param for e in mon.observe(5, _relative(**both))} == {
        "attn.key.bias",
        "attn.key.kernel",
    }


def test_a_check_labelling_a_tensor_zero_exempts_it_while_its_layer_is_healthy():
    # 1e-8 is a thousandth of the bias: above rounding level, so only the label exempts it.
    mon = HealthMonitor(RELATIVE, HealthThresholds(patience=1))
    mon.mark_zero({"dense.kernel": True})
    assert mon.observe(0, _relative(**{"dense.kernel": 1e-8, "dense.bias": 1e-5})) == []
    # A check labels the entries of a truly vanishing layer zero too: still judged.
    both = {"dense.kernel": 1e-9, "dense.bias": 1e-9}
    assert [e.param for e in mon.observe(1, _relative(**both))] == ["dense.kernel"]
    mon.mark_zero({"dense.kernel": False})  # a later check measured a derivative
    one = {"dense.kernel": 1e-8, "dense.bias": 1e-5}
    mon2 = HealthMonitor(RELATIVE, HealthThresholds(patience=1))
    assert [e.param for e in mon2.observe(0, _relative(**one))] == ["dense.kernel"]
