"""The callbacks' signatures are WatchConfig's fields: same names, order and defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from gradwatch.options import WatchConfig

FIELDS = [(f.name, f.default) for f in dataclasses.fields(WatchConfig)]


def _params(cls):
    return [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values()][1:]


def test_lightning_signature_matches_watch_config():
    pytest.importorskip("lightning")
    from gradwatch.lightning import GradWatch

    params = _params(GradWatch)
    assert params[: len(FIELDS)] == FIELDS
    assert [n for n, _ in params[len(FIELDS) :]] == ["loss_fn"]


def test_keras_signature_matches_watch_config():
    pytest.importorskip("keras")
    from gradwatch.keras import GradWatch

    params = _params(GradWatch)
    assert params[: len(FIELDS)] == FIELDS
    assert [n for n, _ in params[len(FIELDS) :]] == ["data", "log_dir", "loss_fn"]


def test_defaults_are_the_documented_ones():
    c = WatchConfig.create()
    assert (c.check_every_n_steps, c.num_params, c.mode, c.dtype) == (
        None,
        32,
        "coordinate",
        "float64",
    )
    assert (c.on_mismatch, c.on_vanish, c.on_explode, c.on_nonfinite) == (
        "warn",
        "warn",
        "warn",
        "halt",
    )
    assert c.max_overhead == 0.02 and c.vanish_threshold == 1e-7 and c.explode_threshold == 1e3


# --- configuration errors: ValueError naming the argument, raised when the config is built --------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
        ({"include": 5}, "include must be a regular expression or a list of them, got 5"),
        ({"exclude": 5}, "exclude must be a regular expression or a list of them, got 5"),
        ({"include": ["fc", 3]}, "include must be a regular expression or a list of them, got 3"),
        ({"exclude": b"fc"}, "exclude must be a regular expression or a list of them, got b'fc'"),
        (
            {"vanish_threshold": 10.0, "explode_threshold": 1.0},
            "vanish_threshold must be below explode_threshold, got vanish_threshold=10.0 and "
            "explode_threshold=1.0",
        ),
        (
            {"vanish_threshold": 1.0, "explode_threshold": 1.0},
            "vanish_threshold must be below explode_threshold, got vanish_threshold=1.0 and "
            "explode_threshold=1.0",
        ),
        (
            {"enable_checks": False, "enable_norms": False},
            "GradWatch would do nothing with enable_checks=False and enable_norms=False: remove "
            "the callback, or set enable_checks=True or enable_norms=True",
        ),
        ({"jsonl_path": 5}, "jsonl_path must be a path (str or os.PathLike) or None, got 5"),
        ({"jsonl_path": ""}, "jsonl_path must be a path (str or os.PathLike) or None, got ''"),
    ],
)
def test_configuration_errors_are_value_errors_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError) as info:
        WatchConfig.from_arguments(kwargs)
    assert str(info.value) == message


def test_pattern_and_path_arguments_are_normalised():
    from pathlib import Path

    c = WatchConfig.from_arguments(
        {"include": (p for p in ["a", "b"]), "exclude": "c", "jsonl_path": Path("x.jsonl")}
    )
    assert (c.include, c.exclude, c.jsonl_path) == (("a", "b"), "c", "x.jsonl")
    assert WatchConfig.from_arguments({"seed": 0, "enable_norms": False}).seed == 0


def test_check_selection_names_patterns_and_parameters():
    from gradwatch.options import check_selection, compile_patterns

    names = [f"layers.{i}.weight" for i in range(12)]
    inc, exc = compile_patterns("include", ["conv"]), compile_patterns("exclude", "bias")
    with pytest.raises(ValueError) as info:
        check_selection(names, inc, exc)
    assert str(info.value) == (
        f"include/exclude left no parameter to check (include=['conv'], exclude=['bias']); "
        f"the 12 trainable parameters are {names[:10]!r} (first 10 of 12)"
    )
    with pytest.raises(ValueError, match=r"\(exclude=\['weight'\]\)"):
        check_selection(names, [], compile_patterns("exclude", "weight"))
    # Nothing trainable (or a model not built yet): not the patterns' fault.
    assert check_selection([], inc, exc) == []
    assert check_selection(names, compile_patterns("include", r"\.1\."), []) == ["layers.1.weight"]
