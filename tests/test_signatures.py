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
    assert [n for n, _ in params[len(FIELDS) :]] == ["data", "log_dir"]


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
