"""GradWatch inside real Lightning Trainer runs (single process; DDP in test_lightning_ddp.py)."""

from __future__ import annotations

import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.nn import functional as F

from gradwatch import GradientCheckError, GradientHealthWarning
from gradwatch.lightning import GradWatch
from tests.helpers.lightning_models import (
    Classifier,
    buggy_net,
    exploding_stack,
    image_loader,
    loader,
    sigmoid_stack,
    trainer,
)
from tests.helpers.torch_zoo import CNN, MLP

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def fit(module, cb, data=None, **kw):
    t = trainer(callbacks=[cb], **kw)
    t.fit(module, data if data is not None else loader())
    return t


def no_health_warnings():
    return warnings.catch_warnings(record=True)


@pytest.mark.parametrize(
    ("make", "data"),
    [
        (lambda: Classifier(MLP(batchnorm=True, dropout=0.3)), loader),
        (lambda: Classifier(CNN()), image_loader),
    ],
    ids=["mlp-dropout-batchnorm", "cnn-bias-before-batchnorm"],
)
def test_healthy_runs_at_defaults_raise_no_events(make, data):
    torch.manual_seed(0)
    cb = GradWatch(check_every_n_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(make(), cb, data(), max_epochs=2)
    assert cb.events == []
    assert not [w for w in caught if issubclass(w.category, GradientHealthWarning)]
    assert cb.reports and all(r.verdict == "pass" for r in cb.reports)
    # Default schedule: the first optimizer step is checked.
    cb2 = GradWatch()
    fit(make(), cb2, data())
    assert cb2.reports[0].step == 0 and cb2.events == []


def test_wrong_backward_gives_mismatch_event_during_fit():
    cb = GradWatch(check_every_n_steps=4, on_mismatch="ignore")
    fit(Classifier(buggy_net(0.9)), cb)
    assert cb.events and {(e.kind, e.param) for e in cb.events} == {("mismatch", "net.0.weight")}
    assert [e.step for e in cb.events] == [r.step for r in cb.reports] == [0, 4]


def test_on_mismatch_raise_propagates_out_of_fit():
    cb = GradWatch(on_mismatch="raise")
    with pytest.raises(GradientCheckError, match=r"mismatch in net\.0\.weight") as info:
        fit(Classifier(buggy_net(0.98)), cb)
    assert info.value.report is not None and info.value.report.verdict == "fail"


def test_on_mismatch_warn_emits_gradient_health_warning():
    with pytest.warns(GradientHealthWarning, match="mismatch"):
        fit(Classifier(buggy_net(-1.0)), GradWatch(check_every_n_steps=100))


def test_sigmoid_stack_vanishes_in_its_first_layers():
    torch.manual_seed(0)
    cb = GradWatch(enable_checks=False, on_vanish="ignore")
    fit(Classifier(sigmoid_stack(), lr=0.01), cb)
    vanishing = {e.param for e in cb.events if e.kind == "vanishing"}
    assert "net.0.weight" in vanishing
    assert "net.26.weight" not in vanishing  # the layer nearest the loss
    assert all(not p.endswith("bias") for p in vanishing)


def test_exploding_stack_halts_well_before_max_steps():
    cb = GradWatch(enable_checks=False, on_explode="halt", on_nonfinite="halt")
    t = fit(Classifier(exploding_stack(), lr=0.5), cb, max_steps=200, max_epochs=100)
    kinds = {e.kind for e in cb.events}
    assert kinds & {"exploding", "nonfinite"}
    assert t.global_step < 50


def test_nonfinite_halts_by_default():
    class NaNAfter(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step >= 3 else loss

    cb = GradWatch(enable_checks=False)
    t = fit(NaNAfter(MLP()), cb, max_epochs=5)
    assert [e.kind for e in cb.events] == ["nonfinite"]
    assert cb.events[0].step == 3 and t.global_step == 4


# --- no trace -------------------------------------------------------------------------------------


def _trajectory(with_callback: bool, tmp_path, name):
    L.seed_everything(1234, workers=True)
    module = Classifier(MLP(batchnorm=True, dropout=0.3), optimizer="adam", lr=0.01)
    cbs = [GradWatch(check_every_n_steps=5)] if with_callback else []
    logger = CSVLogger(tmp_path, name=name)
    t = trainer(callbacks=cbs, logger=logger, max_epochs=2, log_every_n_steps=1)
    t.fit(module, loader(shuffle=True))
    logger.save()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    opt = t.optimizers[0].state_dict()
    metrics = (tmp_path / name / "version_0" / "metrics.csv").read_text()
    metrics = "\n".join(line for line in metrics.splitlines())
    return state, opt, torch.get_rng_state(), t.callback_metrics, metrics, cbs


def test_run_with_checks_is_bit_identical_to_run_without(tmp_path):
    a_state, a_opt, a_rng, a_cm, a_csv, _ = _trajectory(False, tmp_path, "plain")
    b_state, b_opt, b_rng, b_cm, b_csv, cbs = _trajectory(True, tmp_path, "watched")
    assert len(cbs[0].reports) >= 4  # checks really ran
    for k in a_state:
        assert torch.equal(a_state[k], b_state[k]), k
    for pid, st in a_opt["state"].items():
        for key, val in st.items():
            assert torch.equal(val, b_opt["state"][pid][key]), (pid, key)
    assert torch.equal(a_rng, b_rng)
    # Logged metrics are the same; gradwatch only adds its own columns.
    for key, val in a_cm.items():
        assert torch.equal(val, b_cm[key]), key
    header_a = a_csv.splitlines()[0].split(",")
    header_b = b_csv.splitlines()[0].split(",")
    assert set(header_a) <= set(header_b)
    assert "gradwatch/grad_norm/global" in header_b


# --- logging --------------------------------------------------------------------------------------


def test_writes_norms_errors_histograms_and_events_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = GradWatch(check_every_n_steps=4, log_every_n_steps=2, on_mismatch="ignore")
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = fit(Classifier(buggy_net(0.9)), cb, logger=logger)
    acc = EventAccumulator(
        logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert "gradwatch/grad_norm/global" in scalars
    assert "gradwatch/grad_norm/net.0.weight" in scalars
    assert "gradwatch/rel_error/net.0.weight" in scalars and "gradwatch/rel_error/max" in scalars
    # Written on Lightning's own logging steps: (step + 1) % 2 == 0, labelled with its 0-based step.
    assert [e.step for e in acc.Scalars("gradwatch/grad_norm/global")] == [1, 3, 5, 7]
    assert "gradwatch/grad_hist/net.0.weight" in acc.Tags()["histograms"]
    assert "gradwatch/events/text_summary" in acc.Tags()["tensors"]
    assert "gradwatch/grad_norm/global" in t.callback_metrics


def test_jsonl_path_gets_every_record(tmp_path):
    import json

    path = tmp_path / "gw.jsonl"
    cb = GradWatch(
        check_every_n_steps=4, log_every_n_steps=1, jsonl_path=str(path), on_mismatch="ignore"
    )
    fit(Classifier(buggy_net(0.9)), cb)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    types = [r["type"] for r in records]
    assert types.count("norms") == 8 and types.count("report") == 2 and types.count("event") == 2
    schedule = [r for r in records if r["type"] == "schedule"]
    assert [r["step"] for r in schedule] == [0, 4]
    assert all("every 4 optimizer steps" in r["text"] for r in schedule)


def test_two_fits_with_one_callback_are_two_runs_in_one_jsonl_file(tmp_path):
    import json

    from gradwatch.inspect import load

    path = tmp_path / "gw.jsonl"
    cb = GradWatch(
        check_every_n_steps=4, log_every_n_steps=1, jsonl_path=str(path), on_mismatch="ignore"
    )
    fit(Classifier(buggy_net(0.9)), cb, max_steps=3)
    first = cb._watcher.run
    fit(Classifier(buggy_net(0.9)), cb, max_steps=3)  # the same callback, the same file
    second = cb._watcher.run
    records = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["run"] for r in records]  # the first run's records, then the second's
    assert first != second and ids == [first] * ids.count(first) + [second] * ids.count(second)
    runs = load(path)
    assert [r.run_id for r in runs] == [first, second]
    for run in runs:  # each run has its own check at step 0, its own event, its own norms
        assert [(e.step, e.kind) for e in run.events] == [(0, "mismatch")]
        assert sorted(run.norms["global"]) == [0, 1, 2]


def test_csv_logger_gets_running_event_counts(tmp_path):
    import csv

    class NaNAfter(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 2 else loss

    cb = GradWatch(enable_checks=False, on_nonfinite="warn")
    logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(GradientHealthWarning, match="NaN or inf"):
        fit(NaNAfter(MLP()), cb, logger=logger, max_steps=4, log_every_n_steps=1)
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    counts = [
        (row["step"], row["gradwatch/events/nonfinite"])
        for row in rows
        if row.get("gradwatch/events/nonfinite")
    ]
    assert counts == [("2", "1.0")]
    assert [e.kind for e in cb.events] == ["nonfinite"]


# --- training setups -----------------------------------------------------------------------------


def test_gradient_accumulation_checks_per_optimizer_step():
    cb = GradWatch(check_every_n_steps=1)
    fit(Classifier(MLP()), cb, accumulate_grad_batches=2)
    assert [r.step for r in cb.reports] == [0, 1, 2, 3]


class Manual(Classifier):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_needs_loss_fn_at_setup():
    with pytest.raises(ValueError, match=r"manual optimization.*loss_fn"):
        fit(Manual(MLP()), GradWatch())


def test_include_matching_no_parameter_raises_at_setup():
    cb = GradWatch(include=["conv", "attn"], exclude="bias")
    with pytest.raises(ValueError) as info:
        fit(Classifier(MLP()), cb, max_steps=2)
    assert str(info.value) == (
        "include/exclude left no parameter to check (include=['conv', 'attn'], "
        "exclude=['bias']); the 6 trainable parameters are ['net.fc1.weight', 'net.fc1.bias', "
        "'net.fc2.weight', 'net.fc2.bias', 'net.out.weight', 'net.out.bias']"
    )
    assert cb.reports == [] and cb.events == []  # raised before the first step
    # The patterns only select what is checked: with checks off they are not judged.
    cb = GradWatch(include="conv", enable_checks=False)
    fit(Classifier(MLP()), cb, max_steps=2)
    assert cb.events == []


def test_manual_optimization_with_loss_fn():
    def loss_fn(module, batch):
        x, y = batch
        return F.cross_entropy(module.net(x), y)

    cb = GradWatch(check_every_n_steps=2, loss_fn=loss_fn)
    fit(Manual(MLP()), cb)
    assert [r.step for r in cb.reports] == [0, 2, 4, 6]
    assert all(r.verdict == "pass" for r in cb.reports)


def test_training_step_returning_none_skips_that_check_only():
    class SometimesNone(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx == 0 else loss

    cb = GradWatch(check_every_n_steps=1)
    with pytest.warns(GradientHealthWarning, match="returned None"):
        fit(SometimesNone(MLP()), cb)
    assert cb.reports and cb.reports[0].step >= 1
    (event,) = [e for e in cb.events if e.kind == "unchecked"]  # once, however many skips
    assert "training_step returned None" in event.message and "return the loss" in event.message


def test_training_step_that_touches_optimizers_turns_checks_off_not_training():
    class PeeksAtOptimizer(Classifier):
        def training_step(self, batch, batch_idx):
            self.log("lr", self.optimizers().param_groups[0]["lr"])
            return super().training_step(batch, batch_idx)

    cb = GradWatch(check_every_n_steps=1, log_every_n_steps=1, jsonl_path=None)
    with pytest.warns(GradientHealthWarning, match="checks are switched off"):
        t = fit(PeeksAtOptimizer(MLP()), cb)
    assert cb.reports == [] and t.global_step == 8
    assert "gradwatch/grad_norm/global" in t.callback_metrics  # norms go on
    # Never silent: one unchecked event with the reason and the fix, and no "no check ran" after.
    assert [(e.step, e.kind) for e in cb.events] == [(0, "unchecked")]
    assert "self.optimizers()" in cb.events[0].message and "loss_fn" in cb.events[0].message


def test_a_step_that_cannot_be_rerun_is_an_unchecked_event_in_every_sink_never_raised(tmp_path):
    import json

    class PeeksAtOptimizer(Classifier):
        def training_step(self, batch, batch_idx):
            self.optimizers()
            return super().training_step(batch, batch_idx)

    path = tmp_path / "gw.jsonl"
    cb = GradWatch(check_every_n_steps=1, on_mismatch="raise", jsonl_path=str(path))
    logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(GradientHealthWarning, match="unchecked") as caught:
        t = fit(PeeksAtOptimizer(MLP()), cb, logger=logger, log_every_n_steps=1)
    assert t.global_step == 8  # on_mismatch="raise" neither raised nor halted
    assert len([w for w in caught if "unchecked" in str(w.message)]) == 1  # warned once
    assert [e.kind for e in cb.events] == ["unchecked"]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    (event,) = [r for r in records if r["type"] == "event"]
    assert event["event"]["kind"] == "unchecked" and "cannot be re-run" in event["event"]["message"]
    logger.save()
    csv = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "gradwatch/events/unchecked" in csv.splitlines()[0]


def test_a_run_in_which_no_check_ran_ends_with_one_unchecked_event(tmp_path):
    # gradwatch added to a resumed run whose fixed period puts no step of it on the schedule.
    torch.manual_seed(0)
    t = trainer(max_steps=3, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(Classifier(MLP()), loader())
    ckpt = tmp_path / "plain.ckpt"
    t.save_checkpoint(ckpt)
    cb = GradWatch(check_every_n_steps=1000, on_mismatch="raise")
    t2 = trainer(callbacks=[cb], max_steps=8, max_epochs=3)
    with pytest.warns(GradientHealthWarning, match="no gradient check ran"):
        t2.fit(Classifier(MLP()), loader(), ckpt_path=ckpt)
    assert cb.reports == []
    (event,) = cb.events
    assert (event.kind, event.step) == ("unchecked", 7)
    assert "5 optimizer steps" in event.message and "check_every_n_steps=5" in event.message


def test_a_run_with_checks_ends_without_an_unchecked_event():
    cb = GradWatch(check_every_n_steps=1000)
    fit(Classifier(MLP()), cb)
    assert len(cb.reports) == 1 and cb.events == []
    quiet = GradWatch(enable_checks=False)
    fit(Classifier(MLP()), quiet)
    assert quiet.events == []


def test_uncastable_batch_warns_with_its_type():
    class Holder:
        def __init__(self, x, y):
            self.x, self.y = x, y

    class HolderModule(Classifier):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch.x), batch.y)

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch

    def collate(items):
        return Holder(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]))

    data = torch.utils.data.DataLoader(loader().dataset, batch_size=32, collate_fn=collate)
    cb = GradWatch(check_every_n_steps=1)
    with pytest.warns(GradientHealthWarning, match="Holder"):
        fit(HolderModule(MLP()), cb, data=data)
    assert cb.reports == []
    (event,) = cb.events  # once per reason, and no "no check ran" on top of it
    assert event.kind == "unchecked" and "loss_fn" in event.message


def test_sparse_embedding_gradients_give_norms():
    from tests.helpers.torch_zoo import RNN

    seq = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(0, 30, (64, 7)), torch.randint(0, 4, (64,))),
        batch_size=16,
    )
    cb = GradWatch(check_every_n_steps=2, jsonl_path=None)
    t = fit(Classifier(RNN(sparse=True), optimizer="sgd"), cb, data=seq)
    assert torch.isfinite(t.callback_metrics["gradwatch/grad_norm/global"])
    assert cb.events == []


def test_bf16_mixed_gives_no_false_alarms():
    torch.manual_seed(0)
    cb = GradWatch(check_every_n_steps=3)
    fit(Classifier(MLP(batchnorm=True)), cb, precision="bf16-mixed", max_epochs=2)
    assert cb.events == []
    assert cb.reports and all(r.verdict == "pass" for r in cb.reports)


def test_resume_from_checkpoint_continues_the_schedule(tmp_path):
    torch.manual_seed(0)
    cb = GradWatch(check_every_n_steps=3, patience=5)
    t = trainer(callbacks=[cb], max_steps=4, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(Classifier(MLP()), loader())
    ckpt = tmp_path / "resume.ckpt"
    t.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"][cb.state_key]
    assert state["watcher"]["checks_done"] == 2

    cb2 = GradWatch(check_every_n_steps=3, patience=5)
    t2 = trainer(callbacks=[cb2], max_steps=8, max_epochs=3)
    t2.fit(Classifier(MLP()), loader(), ckpt_path=ckpt)
    assert [r.step for r in cb2.reports] == [6]
    assert cb2._watcher.checks_done == 3
    assert cb2._watcher.run == cb._watcher.run  # a resumed run keeps its id


def test_state_key_tells_instances_apart():
    assert GradWatch(mode="coordinate").state_key != GradWatch(mode="directional").state_key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"check_every_n_steps": 0}, "check_every_n_steps"),
        ({"num_params": -1}, "num_params"),
        ({"mode": "diagonal"}, "mode must be one of"),
        ({"dtype": "half"}, "dtype must be one of"),
        (
            {"on_vanish": "explode"},
            "on_vanish must be one of 'ignore', 'warn', 'halt', 'raise'; got 'explode'",
        ),
        ({"max_overhead": 0}, "max_overhead"),
        ({"patience": 0}, "patience"),
        ({"loss_fn": 3}, "loss_fn must be callable"),
        ({"exclude": "(["}, "exclude has an invalid"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"include": 5}, "include must be a regular expression or a list of them, got 5"),
        ({"exclude": 5}, "exclude must be a regular expression or a list of them, got 5"),
        (
            {"vanish_threshold": 1e3, "explode_threshold": 1e3},
            "vanish_threshold must be below explode_threshold, got vanish_threshold=1000.0 "
            "and explode_threshold=1000.0",
        ),
        (
            {"enable_checks": False, "enable_norms": False},
            "GradWatch would do nothing with enable_checks=False and enable_norms=False",
        ),
        ({"jsonl_path": 5}, "jsonl_path must be a path (str or os.PathLike) or None, got 5"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        GradWatch(**kwargs)


def test_gradscaler_skipped_steps_are_counted_not_reported():
    """16-mixed exists only on CUDA; drive the hook with a stand-in trainer and GradScaler."""
    from types import SimpleNamespace

    model = MLP()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = SimpleNamespace(get_scale=lambda: 65536.0)
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0))
    trainer = SimpleNamespace(
        fit_loop=loop,
        precision_plugin=SimpleNamespace(scaler=scaler),
        global_rank=0,
        world_size=1,
        loggers=[],
        should_stop=False,
    )
    cb = GradWatch(enable_checks=False, on_nonfinite="halt")
    from gradwatch.lightning.norms import GradNorms

    cb._norms = GradNorms(list(model.named_parameters()))
    cb._watcher.start({n: tuple(p.shape) for n, p in model.named_parameters()})
    for step in range(9):
        loop.epoch_loop._batches_that_stepped = step
        cb.on_before_optimizer_step(trainer, model, opt)
    assert cb.skipped_steps == 9 and cb.events == [] and not trainer.should_stop
    loop.epoch_loop._batches_that_stepped = 9
    cb.on_before_optimizer_step(trainer, model, opt)  # the 10th in a row: the scale is collapsing
    assert [(e.kind, e.param, e.step) for e in cb.events] == [("nonfinite", "global", 9)]
    assert "GradScaler skipped 10" in cb.events[0].message and trainer.should_stop
    # A finite step ends the run of skips; the norms are then fed to the health rules as usual.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cb.on_before_optimizer_step(trainer, model, opt)
    assert cb._watcher.consecutive_skips == 0 and cb._step_rows
