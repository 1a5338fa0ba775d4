"""A halt (or raise) on non-finite or exploding gradients acts before that step's update.

Real ``Trainer.fit`` runs: the weights, the optimizer state and every checkpoint written after the
halt stay finite; norms are read to the host once per block, plus one boolean per step when a
policy can stop training.
"""

from __future__ import annotations

import math
import sys
from collections import Counter

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional as F

from gradwatch import GradientCheckError
from gradwatch.lightning import GradWatch
from gradwatch.lightning.norms import GradNorms
from gradwatch.watch.watcher import HEALTH_BLOCK
from tests.helpers.lightning_models import Classifier, loader, trainer
from tests.helpers.torch_zoo import MLP

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::gradwatch.GradientHealthWarning"),
]

BAD_BATCH = 3


class Standardised(Classifier):
    """Per-batch standardisation, as tutorials write it: a zero-variance batch divides 0 by 0."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = (x - x.mean(0)) / x.std(0)
        return F.cross_entropy(self.net(x), y)


def constant_batch_loader(bad=BAD_BATCH, batch_size=16, n=128):
    data = loader(n=n, batch_size=batch_size)
    xs, ys = [], []
    for i, (x, y) in enumerate(data):
        xs.append(x[:1].expand_as(x).clone() if i == bad else x)  # every row the same
        ys.append(y)
    ds = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t))


def optimizer_tensors(opt):
    return [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]


def test_the_planted_batch_really_makes_the_weights_nan_without_gradwatch():
    module = Standardised(MLP(), optimizer="adam", lr=0.01)
    trainer(max_epochs=1).fit(module, constant_batch_loader())
    assert not finite(module.parameters())


def test_halt_skips_the_nonfinite_update_and_the_last_checkpoint_stays_finite(tmp_path):
    module = Standardised(MLP(), optimizer="adam", lr=0.01)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    cb = GradWatch(enable_checks=False)  # on_nonfinite="halt" by default
    t = trainer(callbacks=[cb, ckpt], enable_checkpointing=True, max_epochs=3)
    t.fit(module, constant_batch_loader())
    assert [(e.kind, e.step) for e in cb.events] == [("nonfinite", BAD_BATCH)]
    assert t.global_step == BAD_BATCH + 1  # the step ran; its update did not
    assert finite(module.parameters()) and finite(optimizer_tensors(t.optimizers[0]))
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == BAD_BATCH + 1
    assert finite(last["state_dict"].values())
    assert finite(v for s in last["optimizer_states"][0]["state"].values() for v in s.values())


def test_halt_puts_back_the_batchnorm_statistics_the_bad_forward_pass_changed():
    module = Standardised(MLP(batchnorm=True), optimizer="sgd", lr=0.05)
    cb = GradWatch(enable_checks=False)
    t = trainer(callbacks=[cb], max_epochs=1)
    t.fit(module, constant_batch_loader())
    assert t.global_step == BAD_BATCH + 1
    buffers = dict(module.named_buffers())
    assert any("running_mean" in n for n in buffers)
    assert finite(buffers.values())
    # The statistics are those after the last good step: BAD_BATCH batches counted, not more.
    counts = [int(b) for n, b in buffers.items() if n.endswith("num_batches_tracked")]
    assert counts and all(c == BAD_BATCH for c in counts)


def test_raise_leaves_the_weights_as_before_the_bad_step():
    module = Standardised(MLP(), optimizer="sgd", lr=0.05)
    cb = GradWatch(enable_checks=False, on_nonfinite="raise")
    t = trainer(callbacks=[cb], max_epochs=1)
    with pytest.raises(GradientCheckError, match=r"nonfinite|NaN"):
        t.fit(module, constant_batch_loader())
    assert finite(module.parameters())
    assert finite(optimizer_tensors(t.optimizers[0]))


def test_explode_halt_skips_the_exploding_update():
    class Blowup(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * 1e8 if self.global_step == 2 else loss

    module = Blowup(MLP(), lr=0.05)
    cb = GradWatch(enable_checks=False, on_explode="halt")
    t = trainer(callbacks=[cb], max_epochs=2)
    t.fit(module, loader(batch_size=16))
    assert [(e.kind, e.step) for e in cb.events][:1] == [("exploding", 2)]
    assert t.global_step == 3
    # The update of step 2 (gradients ~1e8) was skipped: the weights are still of order one.
    assert max(float(p.detach().abs().max()) for p in module.parameters()) < 10


def test_a_finite_gradient_whose_float32_norm_overflows_is_exploding_not_nonfinite():
    grad = torch.full((1000,), 1e22)  # float32 squares overflow; the norm is 3.2e23
    named = [("w", grad)]
    assert not math.isfinite(float(torch.linalg.vector_norm(grad)))
    assert GradNorms.norms(named)["w"] == pytest.approx(1e22 * math.sqrt(1000), rel=1e-6)
    assert math.isnan(GradNorms.norms([("w", torch.tensor([1.0, float("nan")]))])["w"])
    assert GradNorms.norms([("w", torch.tensor([1.0, float("inf")]))])["w"] == math.inf

    class Huge(Classifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1e25

    cb = GradWatch(enable_checks=False, on_explode="halt")
    trainer(callbacks=[cb], max_steps=1).fit(Huge(MLP(), lr=0.0), loader())
    kinds = {e.kind for e in cb.events}
    assert kinds == {"exploding"}, [e.message for e in cb.events]
    assert all(math.isfinite(e.value) for e in cb.events)


SCALAR_READS = ("__bool__", "item", "__float__")
ARRAY_READS = ("numpy", "tolist")


def count_host_reads(monkeypatch):
    """Count the tensor-to-host reads made from gradwatch's own code."""
    counts: Counter[str] = Counter()
    for name in SCALAR_READS + ARRAY_READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("gradwatch."):
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counts


@pytest.mark.parametrize(
    ("policy", "accelerator", "per_step"),
    [("halt", True, 1), ("warn", True, 0), ("warn", False, 1)],
    ids=["halt-guard", "warn-accelerator", "warn-cpu"],
)
def test_norms_are_read_once_per_block_plus_one_boolean_per_step_when_halting(
    monkeypatch, policy, accelerator, per_step
):
    # On an accelerator a host read is a synchronisation: without a stopping policy none per
    # step. On the CPU it is free, and buys the float64 recheck of an overflowing norm.
    import gradwatch.lightning.callback as callback

    monkeypatch.setattr(callback, "host_reads_are_free", lambda device: not accelerator)
    steps = 2 * HEALTH_BLOCK
    cb = GradWatch(enable_checks=False, on_nonfinite=policy, log_every_n_steps=0)
    counts = count_host_reads(monkeypatch)
    trainer(callbacks=[cb], max_steps=steps).fit(
        Classifier(MLP()), loader(n=steps * 8, batch_size=8)
    )
    monkeypatch.undo()
    scalar = sum(counts[n] for n in SCALAR_READS)
    arrays = sum(counts[n] for n in ARRAY_READS)
    assert scalar == per_step * steps, counts
    assert arrays == steps // HEALTH_BLOCK, counts
    assert cb.events == []


def constant_batches_loader(bad, batch_size=16, n=128):
    data = loader(n=n, batch_size=batch_size)
    xs, ys = [], []
    for i, (x, y) in enumerate(data):
        xs.append(x[:1].expand_as(x).clone() if i in bad else x)
        ys.append(y)
    ds = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def test_every_nonfinite_update_is_skipped_while_training_goes_on_past_a_halt():
    # min_epochs makes Lightning ignore should_stop: the second bad step (same episode, no new
    # event) must be skipped too.
    module = Standardised(MLP(batchnorm=True), optimizer="adam", lr=0.01)
    cb = GradWatch(enable_checks=False)
    t = trainer(callbacks=[cb], min_epochs=2, max_epochs=2)
    t.fit(module, constant_batches_loader(bad={3, 4}))
    # One episode per run of bad batches (steps 3-4, then 11-12 in the second epoch).
    assert [(e.kind, e.step) for e in cb.events] == [("nonfinite", 3), ("nonfinite", 11)]
    assert t.global_step == 16  # min_epochs kept it going
    assert finite(module.parameters()) and finite(module.buffers())
    assert finite(optimizer_tensors(t.optimizers[0]))


@pytest.mark.parametrize("policy", ["halt", "warn"])
def test_overflowing_float32_norm_is_exploding_whatever_the_nonfinite_policy(policy):
    class Huge(Classifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1e25

    cb = GradWatch(enable_checks=False, on_nonfinite=policy)
    trainer(callbacks=[cb], max_steps=1).fit(Huge(MLP(), lr=0.0), loader())
    assert {e.kind for e in cb.events} == {"exploding"}, [e.message for e in cb.events]


def test_a_fused_optimizer_under_a_grad_scaler_skips_the_halted_update():
    # 16-mixed needs CUDA; the same sequence Lightning's MixedPrecision plugin runs, on the CPU.
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader()))
    scaler.scale(F.cross_entropy(model(x), y) * 1e30).backward()  # finite, far over the limit
    cb = GradWatch(enable_checks=False, on_explode="halt")
    cb._update_guard.stats = []  # no running statistics to put back in this test
    cb._update_guard.saved_stats = []
    cb._skip_update(opt, scaler)
    scaler.step(opt)  # the fused step sees NaN and skips; the scaler saw its inf check
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_norms_still_on_the_device_travel_in_the_checkpoint_and_are_written_on_an_exception(
    tmp_path,
):
    import json

    class Boom(Classifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    path = tmp_path / "gw.jsonl"
    cb = GradWatch(enable_checks=False, log_every_n_steps=1, jsonl_path=str(path))
    with pytest.raises(RuntimeError, match="boom"):
        trainer(callbacks=[cb], max_epochs=1).fit(Boom(MLP()), loader())
    steps = [
        r["step"] for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "norms"
    ]
    assert steps == [0, 1, 2, 3, 4]  # read off the device when training failed

    cb = GradWatch(enable_checks=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
    t = trainer(callbacks=[cb, ckpt], enable_checkpointing=True, max_steps=8)
    t.fit(Classifier(MLP()), loader())
    saved = torch.load(next(tmp_path.glob("*step=6*.ckpt")), weights_only=False)
    state = saved["callbacks"][cb.state_key]
    assert state["device_rows"]["steps"] == [0, 1, 2, 3, 4, 5]  # not yet read at step 6
    fresh = GradWatch(enable_checks=False)
    fresh.load_state_dict(state)
    assert [s for s, _ in fresh._watcher._pending_rows] == [0, 1, 2, 3, 4, 5]
