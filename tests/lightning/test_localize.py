"""A failing check in a Lightning run names the module whose backward is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from gradwatch.inspect import load
from gradwatch.lightning import GradWatch
from tests.helpers.lightning_models import trainer
from tests.helpers.localize_models import (
    TRANSFORMER_CULPRIT,
    token_batch,
)
from tests.helpers.transformer_run import DemoLM

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _data(batches: int = 2):
    inputs, target = token_batch(n=4 * batches, seed=1)
    dataset = torch.utils.data.TensorDataset(inputs, target)
    return torch.utils.data.DataLoader(dataset, batch_size=4)


def test_a_failing_check_names_the_buggy_module_in_its_events(tmp_path):
    path = tmp_path / "run.jsonl"
    cb = GradWatch(check_every_n_steps=1, on_mismatch="ignore", jsonl_path=str(path))
    trainer(callbacks=[cb], max_steps=1).fit(DemoLM(bug=True), _data())
    mismatches = [e for e in cb.events if e.kind == "mismatch"]
    assert mismatches
    assert {e.module for e in mismatches} == {f"model.{TRANSFORMER_CULPRIT}"}
    assert mismatches[0].message.startswith(
        f"the backward of model.{TRANSFORMER_CULPRIT} (MyGELU) is wrong: its input gradient is "
        f"off by 10%"
    )
    assert [r.culprit for r in cb.localizations] == [f"model.{TRANSFORMER_CULPRIT}"]
    # the report written carries the same events, and inspect reads the module back
    assert cb.reports[0].events[0].module == f"model.{TRANSFORMER_CULPRIT}"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert any(x.get("module") == f"model.{TRANSFORMER_CULPRIT}" for x in _events(lines))
    runs = load(str(tmp_path))
    assert {e.module for run in runs for e in run.events if e.kind == "mismatch"} == {
        f"model.{TRANSFORMER_CULPRIT}"
    }


def _events(lines):
    for x in lines:
        if x.get("kind") == "mismatch" or x.get("type") == "event":
            yield x.get("event", x)


def test_a_passing_run_localizes_nothing():
    cb = GradWatch(check_every_n_steps=1)
    trainer(callbacks=[cb], max_steps=1).fit(DemoLM(bug=False), _data())
    assert cb.events == [] and cb.localizations == []


def test_later_failing_checks_localize_only_within_the_budget():
    cb = GradWatch(check_every_n_steps=1, on_mismatch="ignore", max_overhead=0.01)
    trainer(callbacks=[cb], max_steps=3).fit(DemoLM(bug=True), _data(3))
    assert len(cb.reports) == 3 and all(r.verdict == "fail" for r in cb.reports)
    # the first always; a localization costs far more than 1% of a few training steps
    assert len(cb.localizations) == 1
    steps = sorted({e.step for e in cb.events if e.module is not None})
    assert steps == [0]


def test_mode_modules_checks_each_module_and_names_the_culprit(tmp_path):
    cb = GradWatch(check_every_n_steps=1, mode="modules", on_mismatch="ignore")
    trainer(callbacks=[cb], max_steps=2).fit(DemoLM(bug=True), _data())
    assert [r.mode for r in cb.reports] == ["modules", "modules"]
    assert all(r.verdict == "fail" for r in cb.reports), [str(r) for r in cb.reports]
    failing = [e for e in cb.events if e.kind == "mismatch"]
    assert {e.module for e in failing} == {f"model.{TRANSFORMER_CULPRIT}"}
    assert cb.localizations == []  # the check itself localized: no second localization
    good = GradWatch(check_every_n_steps=1, mode="modules")
    trainer(callbacks=[good], max_steps=1).fit(DemoLM(bug=False), _data())
    assert [r.verdict for r in good.reports] == ["pass"], [str(r) for r in good.reports]


def test_mode_modules_include_names_modules_and_is_checked_at_setup():
    cb = GradWatch(
        check_every_n_steps=1, mode="modules", include=r"decoder\.layers\.1\.activation$"
    )
    trainer(callbacks=[cb], max_steps=1).fit(DemoLM(bug=True), _data())
    assert {e.module for e in cb.events if e.kind == "mismatch"} == {f"model.{TRANSFORMER_CULPRIT}"}
    bad = GradWatch(mode="modules", include="no_such_module")
    with pytest.raises(ValueError, match="left no module to check"):
        trainer(callbacks=[bad], max_steps=1).fit(DemoLM(bug=False), _data())
