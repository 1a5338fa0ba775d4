"""The log vocabulary: the names the sinks write and inspect reads."""

from __future__ import annotations

import json

from gradwatch import CheckReport, EntryResult, GradientEvent
from gradwatch.watch import tags


def test_tag_names():
    assert tags.norm_tag("a.b") == "gradwatch/grad_norm/a.b"
    assert tags.rel_error_tag("a.b") == "gradwatch/rel_error/a.b"
    assert tags.hist_tag("a.b") == "gradwatch/grad_hist/a.b"
    assert tags.norm_tag(tags.GLOBAL_NAME) == tags.GLOBAL_NORM_TAG
    assert tags.rel_error_tag(tags.MAX_NAME) == tags.MAX_REL_ERROR_TAG


def test_report_scalars_take_the_worst_conclusive_entry_per_tensor():
    results = (
        EntryResult("w", (0,), 1.0, 0.9, 0.1, "mismatch"),
        EntryResult("w", (1,), 1.0, 1.0, 1e-8, "ok"),
        EntryResult("b", (0,), 1.0, 3.0, None, "kink"),
    )
    report = CheckReport(3, "fail", 0.1, results, (), "coordinate", "float64", 1e-3, 7, 0.0)
    assert tags.report_scalars(report) == {
        "gradwatch/rel_error/w": 0.1,
        "gradwatch/rel_error/max": 0.1,
    }


def test_event_text_is_the_event_as_json():
    e = GradientEvent(4, "exploding", "w", float("inf"), 1e3, "too big")
    assert GradientEvent.from_dict(json.loads(tags.event_text(e))) == e


def test_custom_scalars_layout_names_both_charts():
    summary = tags.custom_scalars_layout()
    assert summary.value[0].tag == "custom_scalars__config__"
    payload = summary.value[0].tensor.string_val[0]
    assert b"gradwatch/grad_norm/.*" in payload and b"gradwatch/rel_error/.*" in payload
