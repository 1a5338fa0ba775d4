import json
import math

from gradwatch import CheckReport, EntryResult, GradientEvent
from gradwatch.report import json_float


def test_nonfinite_numbers_become_strings():
    assert [json_float(x) for x in (math.nan, math.inf, -math.inf, 1.5)] == [
        "nan",
        "inf",
        "-inf",
        1.5,
    ]
    e = GradientEvent(2, "nonfinite", "global", math.nan, math.inf, "bad")
    d = e.to_dict()
    assert d["value"] == "nan" and d["threshold"] == "inf"
    json.dumps(d, allow_nan=False)
    back = GradientEvent.from_dict(d)
    assert math.isnan(back.value) and back.threshold == math.inf


def test_report_str_names_the_worst_entries_first():
    results = (
        EntryResult("a", (0,), 1.0, 1.0, 0.0, "ok"),
        EntryResult("b", (1, 2), 1.0, -1.0, 2.0, "mismatch"),
        EntryResult("c", None, 0.0, 0.0, None, "zero"),
    )
    ev = GradientEvent(1, "mismatch", "b", 2.0, 1e-3, "b is wrong")
    r = CheckReport(1, "fail", 2.0, results, (ev,), "coordinate", "float64", 1e-3, 7, 0.1)
    lines = str(r).splitlines()
    assert "FAIL" in lines[0] and "step 1" in lines[0]
    assert "1 ok, 1 mismatch, 1 zero" in lines[1]
    assert lines[3].strip().startswith("b[1, 2]")
    assert any("b is wrong" in line for line in lines)
    assert r.failed == (results[1],)
    assert r.worst_by_param() == {"a": 0.0, "b": 2.0}
    json.dumps(r.to_dict(), allow_nan=False)
