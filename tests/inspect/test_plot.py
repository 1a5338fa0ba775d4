"""``--plot`` at real sizes: the heatmap of 200 tensors, one-step runs, a real buggy Transformer."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from gradwatch import GradientEvent
from gradwatch.inspect import RunData, load, plot, plot_figure
from gradwatch.inspect.plot_data import group_tensors, module_of
from tests.helpers.transformer_run import fit_buggy_transformer

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

LONG_TAIL = "mlp.experts.gate_projection_for_the_mixture_of_experts_router.weight"
TAILS = [
    "attention.query.kernel",
    "attention.query.bias",
    "attention.key.kernel",
    "attention.value.kernel",
    "attention.output.kernel",
    "norm1.gamma",
    "norm1.beta",
    "mlp.dense_in.kernel",
    "mlp.dense_out.kernel",
    LONG_TAIL,
]


def _name(i: int) -> str:
    stage, block, tail = i // 50, (i // 10) % 5, TAILS[i % 10]
    return f"model.backbone.stages.{stage}.blocks.{block}.{tail}"


def synthetic_run(tensors: int = 200, failing: int = 24) -> tuple[RunData, list[str]]:
    """One step of ``tensors`` tensors; the first ``failing`` of block 3 and on fail one check,
    all with the same relative error (0.1); one tensor vanishes, one is exactly zero."""
    names = [_name(i) for i in range(tensors)]
    run = RunData("synthetic", meta={"shapes": {n: [16, 16] for n in names}, "rtol": 1e-3})
    for i, name in enumerate(names):
        run.norms[name] = {0: 0.0 if i == 5 else 10.0 ** (-2 - i % 7)}
        run.rel_errors[name] = {0: 1e-9}
    bad = names[30 : 30 + failing]
    for name in bad:
        run.rel_errors[name] = {0: 0.1}
        run.add_event(
            GradientEvent(0, "mismatch", name, 0.1, 1e-3, "off by 10%", module=module_of(bad[0]))
        )
    run.add_event(GradientEvent(0, "vanishing", names[7], 1e-12, 1e-7, "vanished"))
    return run, bad


def _texts(ax, prefix):
    return [t for t in ax.texts if (t.get_gid() or "").startswith(prefix)]


def _boxes(fig, artists):
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return [a.get_window_extent(renderer) for a in artists]


def assert_apart(boxes, slack=0.5):
    """No two boxes share more than a sliver (``slack`` pixels) in both directions."""
    for a, b in itertools.combinations(boxes, 2):
        dx = min(a.x1, b.x1) - max(a.x0, b.x0)
        dy = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert dx <= slack or dy <= slack, (a, b)


def heat_rows(ax):
    return sum(im.get_array().shape[0] for im in ax.images)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_module_groups_follow_blocks_and_keep_model_order():
    names = [_name(i) for i in range(20)]
    groups = group_tensors(names)
    assert [g.name for g in groups] == [
        "model.backbone.stages.0.blocks.0",
        "model.backbone.stages.0.blocks.1",
    ]
    assert [t for g in groups for t in g.tensors] == names


def test_two_hundred_tensors_of_one_step_render_readably(tmp_path):
    run, bad = synthetic_run()
    fig = plot_figure([run])
    heat = fig.axes[0]
    assert heat_rows(heat) == 200
    assert all(im.get_array().shape[1] == 1 for im in heat.images)  # one step: one column
    assert all(np.ma.count(im.get_array()) > 0 for im in heat.images)  # cells are drawn
    # every tensor is labelled; long names keep their distinguishing tail
    labels = [t.get_text() for t in heat.get_yticklabels()]
    assert len(labels) == 200
    assert labels[9].startswith("…") and labels[9].endswith("router.weight")
    assert {t.get_text() for t in heat.get_yticklabels() if t.get_color() != "black"} == {
        label
        for label, name in zip(labels, [_name(i) for i in range(200)], strict=True)
        if name in bad
    }
    # each failing tensor is named once, at its own row, even though all share one value
    notes = _texts(heat, "gradwatch:note:")
    failing = [t for t in notes if t.get_gid().removeprefix("gradwatch:note:") in bad]
    assert len(failing) == len(bad) and all(
        "mismatch in 1 check, worst 0.1" in t.get_text() for t in failing
    )
    assert any("vanishing at step 0" in t.get_text() for t in notes)
    assert _texts(heat, "gradwatch:module:")  # the localized module's group is marked
    assert [c.get_gid() for c in heat.collections] == ["gradwatch:cells:vanishing"]
    assert_apart(_boxes(fig, notes + _texts(heat, "gradwatch:module:")))
    ticks = sorted(_boxes(fig, heat.get_yticklabels()), key=lambda b: b.y0)
    assert all(a.y1 <= b.y0 + 0.5 for a, b in itertools.pairwise(ticks))
    # the strip: one row per module group, a red cross for the failing group's check
    strip = fig.axes[2]
    assert len(strip.get_yticklabels()) == len(group_tensors([_name(i) for i in range(200)]))
    crosses = [c for c in strip.collections if c.get_gid() == "gradwatch:checks:fail"]
    assert len(crosses[0].get_offsets()) == len({module_of(n) for n in bad})
    assert_apart(_boxes(fig, _texts(strip, "gradwatch:strip:")))
    out = plot([run], tmp_path / "big.png")
    width, height = png_size(out)
    assert 900 <= width <= 2000 and 2600 <= height <= 4000  # ~0.13 in per row at 100 dpi


def test_one_step_run_draws_its_cells_and_its_check(tmp_path):
    run = RunData(
        "short",
        norms={"net.0.weight": {3: 0.5}, "net.0.bias": {3: 0.2}, "net.2.weight": {3: 0.1}},
        rel_errors={"net.0.weight": {3: 0.2}, "net.2.weight": {3: 1e-9}},
    )
    fig = plot_figure([run])
    heat, strip = fig.axes[0], fig.axes[2]
    assert heat_rows(heat) == 3
    assert sum(np.ma.count(im.get_array()) for im in heat.images) == 3
    offsets = {c.get_gid(): len(c.get_offsets()) for c in strip.collections}
    assert offsets == {"gradwatch:checks:pass": 1, "gradwatch:checks:fail": 1}
    assert "L2 norm" in heat.get_title(loc="left")  # no shapes in the logs: norms, said so
    for suffix in ("svg", "pdf"):
        assert plot([run], tmp_path / f"short.{suffix}").stat().st_size > 1000


def test_several_runs_are_columns_of_one_figure():
    small, _ = synthetic_run(tensors=20, failing=2)
    big, _ = synthetic_run(tensors=100, failing=5)
    fig = plot_figure([small, big])
    heats = [ax for ax in fig.axes if ax.images]
    assert [heat_rows(ax) for ax in heats] == [20, 100]
    assert heats[0].get_position().x1 < heats[1].get_position().x0


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer")
    cb = fit_buggy_transformer(root, steps=4, check_every=2)
    return root, cb


def test_buggy_demo_transformer_plot(transformer_run, tmp_path):
    root, cb = transformer_run
    (run,) = load(root)
    fig = plot_figure([run])
    heat, strip = fig.axes[0], fig.axes[2]
    tensors = len([n for n in run.norms if n != "global"])
    assert tensors >= 60 and heat_rows(heat) == tensors
    assert {im.get_array().shape[1] for im in heat.images} == {4}
    failing = {e.param for e in cb.events if e.kind == "mismatch"}
    assert failing
    notes = _texts(heat, "gradwatch:note:")
    assert {t.get_gid().removeprefix("gradwatch:note:") for t in notes} >= failing
    (module,) = _texts(heat, "gradwatch:module:")
    assert module.get_gid() == "gradwatch:module:model.transformer.decoder.layers.1"
    assert "activation" in module.get_text()
    assert [c for c in strip.collections if c.get_gid() == "gradwatch:checks:fail"]
    assert_apart(_boxes(fig, [*notes, module, *_texts(strip, "gradwatch:strip:")]))
    width, height = png_size(plot([run], tmp_path / "transformer.png"))
    assert 900 <= width <= 1600 and 1200 <= height <= 2400
