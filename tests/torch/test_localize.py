"""gradwatch.torch.localize: each planted backward bug is named at its module, correct models at none."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.torch import localize
from gradwatch.torch.localize import float64_bytes
from tests.helpers.localize_models import (
    CNN_CULPRITS,
    TRANSFORMER_CULPRIT,
    LocCNN,
    MyGELU,
    cnn_batch,
    cnn_loss,
    demo_transformer,
    lm_loss,
    token_batch,
)


@pytest.mark.parametrize("bug", sorted(CNN_CULPRITS))
def test_each_planted_bug_in_a_cnn_is_localized_to_its_module(bug):
    torch.manual_seed(1)
    report = localize(LocCNN(bug), cnn_batch(), cnn_loss)
    expected = CNN_CULPRITS[bug]
    assert report.culprit == expected, str(report)
    assert report.culprits == (expected,), str(report)
    assert "<- culprit" in str(report)
    assert report.result(expected).verdict == "fail"


def test_a_correct_cnn_has_no_culprit_and_every_module_passes():
    torch.manual_seed(1)
    report = localize(LocCNN(), cnn_batch(), cnn_loss)
    assert report.culprit is None and report.culprits == ()
    assert {m.verdict for m in report.modules} == {"pass"}, str(report)
    names = [m.name for m in report.modules]
    assert names[0] == "<model>" and "block2.act" in names  # model order, root first
    assert report.result("pool").calls == 2  # a module called twice is checked per call


def test_the_messages_say_what_is_wrong():
    torch.manual_seed(1)
    act = localize(LocCNN("activation"), cnn_batch(), cnn_loss)
    assert (
        act.summary
        == "the backward of block2.act (MyGELU) is wrong: its input gradient is off by 10%"
    )
    detached = localize(LocCNN("detached"), cnn_batch(), cnn_loss)
    assert "gate gradient is missing" in detached.result("gate").detail


def test_a_module_used_twice_is_checked_at_each_call():
    torch.manual_seed(1)
    report = localize(LocCNN("twice"), cnn_batch(), cnn_loss)
    shared = report.result("block1.act")
    assert shared.calls == 2 and shared.type == "MyGELU"
    # block2 calls the shared module: it fails, but it is not a culprit of its own.
    assert report.result("block2").verdict == "fail"
    assert report.culprits == ("block1.act",)


def test_the_model_is_left_exactly_as_it_was():
    torch.manual_seed(1)
    model = LocCNN("norm")
    batch = cnn_batch()
    cnn_loss(model, batch).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    localize(model, batch, cnn_loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.dtype is torch.float32 for p in model.parameters())


def test_the_report_is_json_and_a_public_record():
    torch.manual_seed(1)
    report = localize(LocCNN("activation"), cnn_batch(), cnn_loss)
    assert isinstance(report, gradwatch.LocalizationReport)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["culprit"] == "block2.act"
    assert {m["name"] for m in data["modules"]} >= {"block2.act", "head"}


def test_include_and_exclude_select_modules_by_name():
    torch.manual_seed(1)
    only = localize(LocCNN("activation"), cnn_batch(), cnn_loss, include=r"^block2")
    assert {m.name for m in only.modules} == {"block2", "block2.conv", "block2.norm", "block2.act"}
    assert only.culprit == "block2.act"
    without = localize(LocCNN("activation"), cnn_batch(), cnn_loss, exclude=r"act$")
    assert without.culprit == "block2"  # the parent is all that is left that holds the bug


def test_a_module_never_called_is_reported_as_skipped():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    report = localize(Net(), torch.randn(4, 3), lambda m, x: m(x).pow(2).sum())
    assert report.culprit is None
    assert [name for name, _ in report.skipped] == ["unused"]


def test_max_check_memory_is_validated():
    with pytest.raises(ValueError, match="max_check_memory"):
        localize(LocCNN(), cnn_batch(), cnn_loss, max_check_memory=0)


@pytest.mark.parametrize("bug", ["activation", "norm", None])
def test_a_model_over_max_check_memory_is_checked_module_by_module(bug):
    torch.manual_seed(1)
    model = LocCNN(bug)
    whole = float64_bytes(model)
    limit = float64_bytes(model.block1) + 8  # block1 fits alone; block2, head, the model do not
    assert whole > limit
    report = localize(model, cnn_batch(), cnn_loss, max_check_memory=limit)
    assert any("checked module by module" in n for n in report.notes), str(report)
    too_large = {name for name, why in report.skipped if why.startswith("too large to check alone")}
    assert too_large == {"<model>", "block2", "block2.conv", "head"}, str(report)
    assert report.result("block2.act").verdict == ("fail" if bug == "activation" else "pass")
    expected = {"activation": ("block2.act",), "norm": ("block1.norm",), None: ()}[bug]
    assert report.culprits == expected, str(report)
    assert all(p.dtype is torch.float32 for p in model.parameters())


def test_module_by_module_leaves_the_model_as_it_was():
    torch.manual_seed(1)
    model = LocCNN("norm")
    batch = cnn_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    localize(model, batch, cnn_loss, max_check_memory=float64_bytes(model.block1) + 8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_the_demo_transformer_activation_bug_is_localized():
    report = localize(demo_transformer(bug=True), token_batch(), lm_loss)
    assert report.culprits == (TRANSFORMER_CULPRIT,), str(report)
    assert report.result(TRANSFORMER_CULPRIT).type == "MyGELU"
    assert "off by 10%" in report.summary


def test_the_correct_demo_transformer_has_no_culprit():
    report = localize(demo_transformer(bug=False), token_batch(), lm_loss)
    assert report.culprit is None, str(report)
    # dropout is checked with the mask it drew in training (reseeded, same memory layout)
    assert report.result("transformer.encoder.layers.0.dropout1").verdict == "pass"


def test_a_transformer_layer_copy_keeps_its_module_activation():
    model = demo_transformer(bug=True)
    layer = model.transformer.decoder.layers[1]
    assert isinstance(layer.activation, MyGELU)
    report = localize(model, token_batch(), lm_loss, include="decoder.layers.1")
    assert report.culprit == TRANSFORMER_CULPRIT


def test_a_batchnorm_in_training_mode_is_checked_alone_not_skipped():
    # BatchNorm's backward holds its running statistics: they are put back after it, not before.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).train()
    stats = [b.clone() for b in model.buffers()]
    report = localize(model, torch.randn(8, 5), lambda m, x: m(x).pow(2).mean())
    assert report.skipped == (), report.skipped
    assert report.result("1").verdict == "pass" and report.result("<model>").verdict == "pass"
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))
