import logging
import warnings

import pytest

from gradwatch import GradientCheckError, GradientEvent, GradientHealthWarning
from gradwatch.core.policy import dispatch, policy_for, validate_policy
from gradwatch.core.schedule import BudgetSchedule, FixedSchedule, make_schedule

EVENT = GradientEvent(7, "exploding", "fc.weight", 5e3, 1e3, "too big")


def test_validate_policy_names_argument_allowed_and_given():
    with pytest.raises(
        ValueError, match=r"on_explode must be one of 'ignore', 'warn', 'halt', 'raise'; got 'boom'"
    ):
        validate_policy("on_explode", "boom")


def test_policy_for_maps_kinds():
    pols = {
        "on_mismatch": "raise",
        "on_vanish": "ignore",
        "on_explode": "halt",
        "on_nonfinite": "warn",
    }
    kinds = {
        "mismatch": "raise",
        "disconnected": "raise",
        "vanishing": "ignore",
        "exploding": "halt",
        "nonfinite": "warn",
    }
    for kind, want in kinds.items():
        assert policy_for(GradientEvent(1, kind, "p", 0.0, 0.0, "m"), pols) == want


@pytest.mark.parametrize("policy", ["ignore", "warn", "halt", "raise"])
def test_unchecked_always_warns_and_never_halts_or_raises(policy):
    pols = {k: policy for k in ("on_mismatch", "on_vanish", "on_explode", "on_nonfinite")}
    event = GradientEvent(3, "unchecked", "global", float("nan"), float("nan"), "no loss: do this")
    assert policy_for(event, pols) == "warn"
    with pytest.warns(GradientHealthWarning, match="step 3: unchecked: no loss: do this"):
        action = dispatch([event], pols)
    assert not action.halt and action.error is None


def test_dispatch_ignore_logs_only(caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="gradwatch"):
            action = dispatch([EVENT], {"on_explode": "ignore"})
    assert not action.halt and action.error is None
    assert "fc.weight" in caplog.text


def test_dispatch_warn_emits_category():
    with pytest.warns(GradientHealthWarning, match="exploding in fc.weight"):
        action = dispatch([EVENT], {"on_explode": "warn"})
    assert not action.halt and action.error is None


def test_dispatch_halt_and_raise():
    assert dispatch([EVENT], {"on_explode": "halt"}).halt
    action = dispatch([EVENT], {"on_explode": "raise"})
    assert isinstance(action.error, GradientCheckError)
    assert action.error.event is EVENT


def test_fixed_schedule():
    s = FixedSchedule(5)
    assert [i for i in range(12) if s.due(i)] == [0, 5, 10]
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="check_every_n_steps"):
            FixedSchedule(bad)


def test_budget_schedule_keeps_checks_within_overhead_with_a_fake_clock():
    s = BudgetSchedule(0.02)
    step_time, check_time = 0.01, 0.3
    train = checks = 0.0
    for i in range(20_000):
        if s.due(i):
            checks += check_time
            s.record_check(check_time)
        s.record_step(step_time)
        train += step_time
    assert checks / train <= 0.02 + check_time / train  # at most one check over budget (the first)
    assert checks / train > 0.015  # and the budget is used, not wasted


def test_budget_schedule_first_step_and_explain_and_state():
    s = BudgetSchedule(0.1)
    assert s.due(0)
    assert "first" in s.explain()
    s.record_check(2.0)
    s.record_step(5.0)
    assert not s.due(1)
    assert "20s" in s.explain() and "15s to go" in s.explain()
    t = BudgetSchedule(0.1)
    t.load_state_dict(s.state_dict())
    t.record_step(15.0)
    assert t.due(2)
    for bad in (0, 1.5, -0.1, "x"):
        with pytest.raises(ValueError, match="max_overhead"):
            BudgetSchedule(bad)


def test_make_schedule():
    assert isinstance(make_schedule(None, 0.02), BudgetSchedule)
    assert isinstance(make_schedule(3, 0.02), FixedSchedule)
    with pytest.raises(ValueError, match="check_every_n_steps"):
        make_schedule(0, 0.02)
