"""GPU smoke test: gradwatch's callbacks on CUDA in one short run, with a greppable result table.

Run: python benchmarks/gpu_smoke.py [--device cuda|cpu] [--quick]

Parts (each prints one ``gpu_smoke  STATUS  part  detail`` row; ``grep '^gpu_smoke'``):

1. ``lightning/16-mixed``, ``lightning/bf16-mixed``: a small MLP (a hand-written tanh
   ``autograd.Function`` with a correct backward, generated data) trained a few dozen steps with
   ``GradWatch(check_every_n_steps=5)``: every check passes, no events.
2. ``lightning/planted-bug``: the same activation with its backward 10% off: a ``mismatch`` event.
3. ``lightning/nan-halt``: the loss times NaN at step K, default ``on_nonfinite="halt"`` and a
   ``ModelCheckpoint(save_last=True)``: training stops at step K, the NaN update is not applied
   (parameters and optimizer state finite after ``fit``), ``last.ckpt`` is finite.
4. ``keras/torch``, ``keras/jax``: ``model.fit`` with ``gradwatch.keras.GradWatch()`` (default
   ``jit_compile``), one subprocess per backend (the backend is process-wide); SKIP without keras.
   JAX cannot see live batches, so it gets ``data=`` probe data (docs/keras.md).
5. ``timing``: per-step wall time of a Lightning run with ``GradWatch(enable_checks=False)`` against
   none, interleaved runs, medians; informational (INFO), never asserted.

Exit status 0 only if no part FAILed (SKIP and INFO rows do not count). ``--device cpu`` runs the
same parts on the CPU (``16-mixed`` is skipped there: Lightning offers only ``bf16-mixed`` on CPU),
to try the script on a machine without a GPU. The gradwatch imported is this tree's ``src/``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside torch on one GPU
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this tree's gradwatch, installed or not

IN, CLASSES, BATCH = 32, 5, 64
NAN_STEP = 7
KERAS_TAG = "KERAS_RESULT "
ROWS: list[tuple[str, str, str]] = []


def row(status: str, part: str, detail: str) -> None:
    ROWS.append((status, part, detail))
    print(f"gpu_smoke  {status:<4}  {part:<22}  {detail}", flush=True)


def quiet() -> None:
    """The table is the output: no warnings (GradientHealthWarnings included; gradwatch's own log
    lines still go to stderr) and no Lightning banners."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def make_data(n: int, seed: int = 0) -> tuple[Any, Any]:
    """A learnable classification set: labels are the argmax of a fixed random linear map."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, IN)).astype("float32")
    y = (x @ rng.standard_normal((IN, CLASSES))).argmax(1).astype("int64")
    return x, y


# -- Lightning ----------------------------------------------------------------------------------


def lightning_parts(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch import nn
    from torch.nn import functional as F

    from gradwatch.lightning import GradWatch

    quiet()  # after importing lightning, which sets its loggers' levels
    cuda = args.device == "cuda"
    steps = 30 if args.quick else 60

    class TanhFn(torch.autograd.Function):
        """``tanh`` with a hand-written backward scaled by ``factor`` (1.0: correct; 0.9: a bug)."""

        @staticmethod
        def forward(ctx, x, factor):  # type: ignore[no-untyped-def, override]
            t = torch.tanh(x)
            ctx.save_for_backward(t)
            ctx.factor = factor
            return t

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            (t,) = ctx.saved_tensors
            return g * (1 - t * t) * ctx.factor, None

    class Tanh(nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = TanhFn.apply(x, self.factor)  # type: ignore[no-untyped-call]
            return out

    class Net(L.LightningModule):
        def __init__(self, factor: float = 1.0, nan_at: int | None = None, width: int = 64):
            super().__init__()
            self.nan_at = nan_at
            self.net = nn.Sequential(
                nn.Linear(IN, width),
                Tanh(factor),
                nn.Linear(width, width),
                nn.Tanh(),
                nn.Linear(width, CLASSES),
            )

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            if self.nan_at is not None and self.global_step == self.nan_at:
                loss = loss * float("nan")
            return loss

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    class StepLog(Callback):
        """The global step of every training batch, and losses; not run on gradwatch's twin."""

        def __init__(self) -> None:
            self.steps: list[int] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.steps.append(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            if isinstance(outputs, dict) and "loss" in outputs:
                self.losses.append(float(outputs["loss"].detach()))

    class StepTimer(Callback):
        """After a warm-up: the median time between batch starts, and the mean step (the whole
        stretch over the step count, synchronised at both ends on CUDA)."""

        def __init__(self, warm: int) -> None:
            self.warm = warm
            self.starts: list[float] = []
            self.median = self.mean = math.nan

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            if trainer.global_step == self.warm and cuda:
                torch.cuda.synchronize()
            if trainer.global_step >= self.warm:
                self.starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            if cuda:
                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())
            deltas = [b - a for a, b in itertools.pairwise(self.starts)]
            self.median = statistics.median(deltas)
            self.mean = (self.starts[-1] - self.starts[0]) / len(deltas)

    def loader(batches: int) -> torch.utils.data.DataLoader[Any]:
        x, y = make_data(BATCH * batches)
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)

    def fit(
        model: L.LightningModule,
        callbacks: list[Callback],
        max_steps: int,
        precision: str = "32-true",
        root: str | None = None,
        batches: int = 16,
    ) -> L.Trainer:
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            precision=precision,  # type: ignore[arg-type]
            max_steps=max_steps,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        trainer.fit(model, loader(batches))
        return trainer

    def finite(tensors: Any) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t))

    def summary(cb: GradWatch) -> str:
        verdicts = Counter(r.verdict for r in cb.reports)
        errors = [r.max_rel_error for r in cb.reports if r.max_rel_error is not None]
        kinds = Counter(e.kind for e in cb.events)
        worst = f"{max(errors):.2g}" if errors else "n/a"
        return (
            f"checks={len(cb.reports)} verdicts={dict(verdicts)} max_rel_err={worst} "
            f"events={dict(kinds) or 'none'} skipped_steps={cb.skipped_steps}"
        )

    def run_part(part: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as exc:
            traceback.print_exc()
            ok, detail = False, f"raised {type(exc).__name__}: {exc}"
        row("PASS" if ok else "FAIL", part, detail)

    # 1. mixed precision on a correct model ----------------------------------------------------
    def healthy(precision: str) -> tuple[bool, str]:
        L.seed_everything(0, verbose=False)
        model, cb, log = Net(), GradWatch(check_every_n_steps=5), StepLog()
        fit(model, [cb, log], steps, precision)
        ok = (
            bool(cb.reports)
            and all(r.verdict == "pass" for r in cb.reports)
            and not cb.events
            and finite(model.parameters())
        )
        loss = f" loss {log.losses[0]:.3f}->{log.losses[-1]:.3f}" if log.losses else ""
        return ok, summary(cb) + loss

    for precision in ("16-mixed", "bf16-mixed"):
        part = f"lightning/{precision}"
        if precision == "16-mixed" and not cuda:
            row("SKIP", part, "needs CUDA (Lightning offers only bf16-mixed on the CPU)")
        elif precision == "bf16-mixed" and cuda and not torch.cuda.is_bf16_supported():
            row("SKIP", part, "torch.cuda.is_bf16_supported() is False on this GPU")
        else:
            run_part(part, functools.partial(healthy, precision))

    # 2. a planted bug ----------------------------------------------------------------------------
    def planted_bug() -> tuple[bool, str]:
        L.seed_everything(0, verbose=False)
        cb = GradWatch(check_every_n_steps=5)
        fit(Net(factor=0.9), [cb], 11)
        where = sorted({e.param for e in cb.events if e.kind == "mismatch"})
        ok = bool(where) and any(r.verdict == "fail" for r in cb.reports)
        return ok, f"{summary(cb)} mismatch in {where or 'nothing'}"

    run_part("lightning/planted-bug", planted_bug)

    # 3. NaN gradients: halt before the update ------------------------------------------------
    def nan_halt() -> tuple[bool, str]:
        L.seed_everything(0, verbose=False)
        model, cb, log = Net(nan_at=NAN_STEP), GradWatch(), StepLog()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = ModelCheckpoint(dirpath=tmp, save_last=True, every_n_train_steps=1)
            trainer = fit(model, [cb, log, ckpt], NAN_STEP + 10, root=tmp)
            last = Path(tmp) / "last.ckpt"
            state = (
                torch.load(last, map_location="cpu", weights_only=False) if last.exists() else {}
            )
        nonfinite = [e.step for e in cb.events if e.kind == "nonfinite"]
        opt_state = [
            t
            for o in trainer.optimizers
            for s in o.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        ]
        ckpt_opt = [
            t
            for o in state.get("optimizer_states", [])
            for s in o["state"].values()
            for t in s.values()
            if torch.is_tensor(t)
        ]
        checks = {
            f"stopped at step {NAN_STEP}": bool(log.steps) and max(log.steps) == NAN_STEP,
            f"nonfinite event at step {NAN_STEP}": NAN_STEP in nonfinite,
            "params finite": finite(model.parameters()),
            "optimizer state finite": finite(opt_state),
            "last.ckpt written": bool(state),
            "last.ckpt weights finite": bool(state) and finite(state["state_dict"].values()),
            "last.ckpt optimizer state finite": bool(state) and finite(ckpt_opt),
        }
        failed = [k for k, v in checks.items() if not v]
        detail = (
            f"last step run {max(log.steps) if log.steps else None}, global_step "
            f"{trainer.global_step}, nonfinite events at {nonfinite}; "
            + ("all of: " + ", ".join(checks) if not failed else "NOT: " + ", ".join(failed))
        )
        return not failed, detail

    run_part("lightning/nan-halt", nan_halt)

    # 5. timing (informational) -----------------------------------------------------------------
    def timing() -> None:
        warm, n, pairs = 10, (60 if args.quick else 300), (2 if args.quick else 3)
        timers: dict[str, list[Any]] = {"plain": [], "norms": []}
        for _ in range(pairs):
            for name, done in timers.items():
                L.seed_everything(0, verbose=False)
                timer = StepTimer(warm)
                cbs: list[Callback] = [timer]
                if name == "norms":
                    cbs.append(GradWatch(enable_checks=False))
                fit(Net(width=256), cbs, warm + n, batches=warm + n)  # one epoch
                done.append(timer)
        parts = []
        for stat in ("median", "mean"):
            plain, norms = (
                statistics.median(getattr(t, stat) for t in done) for done in timers.values()
            )
            parts.append(
                f"{stat} step {plain * 1e3:.3f} ms plain, {norms * 1e3:.3f} ms with norms: "
                f"{norms / plain:.2f}x"
            )
        row(
            "INFO",
            "timing",
            "; ".join(parts) + f" (GradWatch(enable_checks=False); medians of {pairs} "
            f"interleaved runs of {n} steps; 32-true; MLP 32-256-256-5, batch {BATCH})",
        )

    try:
        timing()
    except Exception as exc:  # informational: a broken timing run is reported, not failed
        traceback.print_exc()
        row("INFO", "timing", f"not measured: {type(exc).__name__}: {exc}")


# -- Keras (one subprocess per backend) ---------------------------------------------------------


def keras_child(backend: str, device: str, quick: bool) -> dict[str, Any]:
    """Runs in a subprocess with ``KERAS_BACKEND`` set; returns what the parent prints."""
    if backend == "torch":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        import jax

        dev = jax.default_backend()
    if device == "cuda" and dev == "cpu":
        return {"status": "SKIP", "detail": f"{backend} sees no GPU here"}
    import keras

    from gradwatch.keras import GradWatch

    keras.utils.set_random_seed(0)
    x, y = make_data(BATCH * 16)
    model = keras.Sequential(
        [
            keras.Input((IN,)),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # The JAX backend cannot hand live batches out of its jitted step: it needs probe data.
    cb = GradWatch() if backend == "torch" else GradWatch(data=(x[:BATCH], y[:BATCH]))
    hist = model.fit(x, y, batch_size=BATCH, epochs=2 if quick else 4, verbose=0, callbacks=[cb])
    losses = hist.history["loss"]
    verdicts = Counter(r.verdict for r in cb.reports)
    kinds = Counter(e.kind for e in cb.events)
    dtypes = sorted({r.dtype for r in cb.reports})  # float32 on torch/JAX: see docs/keras.md
    ok = bool(cb.reports) and "fail" not in verdicts and not kinds and math.isfinite(losses[-1])
    args = "GradWatch()" if backend == "torch" else "GradWatch(data=probe)"
    detail = (
        f"{args} on {dev}, keras {keras.__version__}, jit_compile={model.jit_compile}: "
        f"checks={len(cb.reports)} verdicts={dict(verdicts)} events={dict(kinds) or 'none'} "
        f"check dtype={dtypes} loss {losses[0]:.3f}->{losses[-1]:.3f}"
    )
    return {"status": "PASS" if ok else "FAIL", "detail": detail}


def keras_parts(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("keras") is None:
        for backend in ("torch", "jax"):
            row("SKIP", f"keras/{backend}", "keras is not installed")
        return
    for backend, lib in (("torch", "torch"), ("jax", "jax")):
        part = f"keras/{backend}"
        if importlib.util.find_spec(lib) is None:
            row("SKIP", part, f"{lib} is not installed")
            continue
        env = dict(os.environ, KERAS_BACKEND=backend)
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, __file__, "--keras-child", backend, "--device", args.device]
        cmd += ["--quick"] if args.quick else []
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            row("FAIL", part, "timed out after 240 s")
            continue
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith(KERAS_TAG)]
        if found:
            result = json.loads(found[-1][len(KERAS_TAG) :])
            row(result["status"], part, result["detail"])
        else:
            sys.stderr.write(proc.stderr[-4000:])
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            row("FAIL", part, f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}")


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer steps and timing runs")
    ap.add_argument("--keras-child", choices=("torch", "jax"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    quiet()

    if args.keras_child:
        try:
            result = keras_child(args.keras_child, args.device, args.quick)
        except Exception as exc:
            traceback.print_exc()
            result = {"status": "FAIL", "detail": f"raised {type(exc).__name__}: {exc}"}
        print(KERAS_TAG + json.dumps(result), flush=True)
        return 0

    import torch

    import gradwatch

    started = time.perf_counter()
    print(
        f"gpu_smoke  versions  python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), lightning {version('lightning')}, keras {version('keras')}, "
        f"jax {version('jax')}, gradwatch from {Path(gradwatch.__file__).parent}"
    )
    if args.device == "cuda":
        if not torch.cuda.is_available():
            row("FAIL", "device", "--device cuda but torch.cuda.is_available() is False")
            return 1
        name = f"cuda:0 {torch.cuda.get_device_name(0)}"
    else:
        name = f"cpu {platform.machine()}, {os.cpu_count()} cores"
    print(f"gpu_smoke  device    {name.strip()}{', --quick' if args.quick else ''}", flush=True)

    lightning_parts(args)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # leave the GPU to the Keras subprocesses
    keras_parts(args)

    failed = [part for status, part, _ in ROWS if status == "FAIL"]
    print(
        f"gpu_smoke  {'FAIL' if failed else 'PASS'}  overall                 "
        f"{len(ROWS)} rows, failed: {', '.join(failed) or 'none'}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
