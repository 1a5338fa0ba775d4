"""gradwatch inspect on logs from real runs, damaged inputs, foreign grad_norm logs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gradwatch.cli import main
from gradwatch.inspect import load, to_json
from gradwatch.lightning import GradWatch
from gradwatch.watch.sinks import TensorBoardSink
from tests.helpers.lightning_models import Classifier, buggy_net, loader, sigmoid_stack, trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    cb = GradWatch(
        check_every_n_steps=4, log_every_n_steps=1, on_mismatch="ignore", on_vanish="ignore"
    )
    logger = TensorBoardLogger(root, name="lit")
    t = trainer(callbacks=[cb], logger=logger)
    t.fit(Classifier(buggy_net(0.9)), loader())
    return root, cb


def cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "gradwatch", "inspect", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_table_names_event_kinds_and_params(lightning_run):
    root, _ = lightning_run
    proc = cli(root)
    assert proc.returncode == 1
    assert "net.0.weight" in proc.stdout and "mismatch" in proc.stdout
    assert "net.2.bias" in proc.stdout and "global" in proc.stdout
    # Model order: the first layer's rows come before the head's.
    assert proc.stdout.index("net.0.weight") < proc.stdout.index("net.2.weight")
    assert cli(root, "--exit-zero").returncode == 0


def test_json_matches_the_callbacks_own_events(lightning_run):
    root, cb = lightning_run
    proc = cli(root, "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["runs"] == ["lit/version_0"]
    got = [(e["step"], e["kind"], e["param"], e["message"]) for e in doc["events"]]
    want = [(e.step, e.kind, e.param, e.message) for e in cb.events]
    assert sorted(got) == sorted(want) and got
    row = doc["params"]["net.0.weight"]
    assert row["steps"] == 8 and row["events"] == len(cb.events)
    assert row["rel_error_max"] == pytest.approx(max(r.max_rel_error for r in cb.reports))
    assert set(row) == {
        "steps",
        "grad_norm_last",
        "grad_norm_min",
        "grad_norm_max",
        "rel_error_max",
        "events",
    }


def test_several_runs_key_params_by_run_and_run_filter(lightning_run, tmp_path):
    root, _ = lightning_run
    sink = TensorBoardSink(tmp_path / "keras" / "gradwatch")
    sink.scalars(1, {"gradwatch/grad_norm/dense/kernel": 0.3, "gradwatch/grad_norm/global": 0.3})
    sink.close()
    import shutil

    shutil.copytree(root / "lit", tmp_path / "lit", dirs_exist_ok=True)
    doc = to_json(load(tmp_path))
    assert doc["runs"] == ["keras/gradwatch", "lit/version_0"]
    assert (
        "keras/gradwatch:dense/kernel" in doc["params"]
        and "lit/version_0:net.0.weight" in doc["params"]
    )
    only = to_json(load(tmp_path, run="keras/*"))
    assert only["runs"] == ["keras/gradwatch"] and only["events"] == []
    assert main(["inspect", str(tmp_path), "--run", "keras/*"]) == 0


def test_param_filter(lightning_run, capsys):
    root, _ = lightning_run
    assert main(["inspect", str(root), "--json", "--param", r"^net\.2\."]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["params"]) == {"net.2.weight", "net.2.bias"} and doc["events"] == []


def test_plot_writes_a_png(lightning_run, tmp_path):
    root, _ = lightning_run
    out = tmp_path / "plot.png"
    proc = cli(root, "--plot", out, "--exit-zero")
    assert proc.returncode == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert 600 <= width <= 4000 and 400 <= height <= 3000
    assert len(data) > 20_000


def test_reads_tf2_tensor_summaries_and_jsonl(tmp_path):
    sink = TensorBoardSink(tmp_path / "run")
    sink.scalars(5, {"gradwatch/grad_norm/model/dense/kernel": 2.0, "gradwatch/rel_error/max": 0.5})
    event = {
        "step": 5,
        "kind": "exploding",
        "param": "model/dense/kernel",
        "value": 2e3,
        "threshold": 1e3,
        "message": "too big",
    }
    sink.text("gradwatch/events", json.dumps(event), 5)
    sink.close()
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "gw.jsonl").write_text(
        json.dumps({"type": "norms", "step": 1, "values": {"w": 1.0}, "global": 1.0})
        + "\n"
        + json.dumps({"type": "event", "step": 1, "event": {**event, "step": 1, "param": "w"}})
        + "\n"
    )
    runs = {r.name: r for r in load(tmp_path)}
    assert runs["run"].norms["model/dense/kernel"] == {5: 2.0}
    assert runs["run"].rel_errors["max"] == {5: 0.5}
    assert [(e.kind, e.step) for e in runs["run"].events] == [("exploding", 5)]
    assert runs["run2"].norms["w"] == {1: 1.0} and runs["run2"].events[0].param == "w"


# --- damaged inputs -------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    proc = cli(tmp_path / "nope")
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_empty_folder_and_folder_without_gradwatch_data(tmp_path):
    proc = cli(tmp_path)
    assert proc.returncode == 2 and "no gradient data" in proc.stderr
    other = TensorBoardSink(tmp_path / "other")
    other.scalars(1, {"train_loss": 0.3})
    other.close()
    proc = cli(tmp_path)
    assert proc.returncode == 2 and "no gradient data" in proc.stderr


def test_random_bytes_file(tmp_path):
    (tmp_path / "events.out.tfevents.123.host").write_bytes(os.urandom(4096))
    proc = cli(tmp_path)
    assert proc.returncode == 2
    assert "events.out.tfevents.123.host" in proc.stderr  # the warning names the file


def test_truncated_event_file_keeps_what_was_read(lightning_run, tmp_path):
    root, _ = lightning_run
    (src,) = list((root / "lit" / "version_0").glob("events*"))
    data = src.read_bytes()
    cut = tmp_path / src.name
    cut.write_bytes(data[: int(len(data) * 0.6)])
    proc = cli(tmp_path, "--json")
    assert proc.returncode in (0, 1)
    assert "truncated" in proc.stderr and src.name in proc.stderr
    doc = json.loads(proc.stdout)
    assert 0 < doc["params"]["net.0.weight"]["steps"] < 8


def test_bad_param_regex_is_usage_error(lightning_run):
    root, _ = lightning_run
    proc = cli(root, "--param", "([")
    assert proc.returncode == 2 and "--param" in proc.stderr


# --- logs gradwatch did not write ----------------------------------------------------------------


class GradNormLogger(Classifier):
    def on_before_optimizer_step(self, optimizer):
        from lightning.pytorch.utilities import grad_norm

        self.log_dict(grad_norm(self, norm_type=2))


def test_lightning_grad_norm_logs_are_recovered_and_judged(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="plain")
    t = trainer(logger=logger, log_every_n_steps=1, max_epochs=2)
    t.fit(GradNormLogger(sigmoid_stack(), lr=0.01), loader())
    runs = load(tmp_path)
    assert len(runs) == 1 and runs[0].foreign
    assert "net.0.weight" in runs[0].norms and "global" in runs[0].norms
    kinds = {(e.kind, e.param) for e in runs[0].events}
    assert ("vanishing", "net.0.weight") in kinds
    proc = cli(tmp_path)
    assert proc.returncode == 1 and "vanishing" in proc.stdout
