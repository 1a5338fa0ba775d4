"""gradwatch's cost, as ratios measured side by side in one process (interleaved, medians).

Run: python benchmarks/run.py [--quick] [--write docs/performance.md]

Threads are pinned (torch.set_num_threads, TF intra/inter op = the same) and stated in the output.
Nothing here is asserted: tests never time anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

THREADS = int(os.environ.get("GRADWATCH_BENCH_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

torch.set_num_threads(THREADS)

ROWS: list[tuple[str, str, str]] = []


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"{what:<62} {value:>14}  {note}", flush=True)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, calls interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# -- torch models -------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.drop, self.fc = nn.Dropout(0.25), nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


class LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.out = (
            nn.Embedding(100, 32),
            nn.LSTM(32, 64, 2, batch_first=True),
            nn.Linear(64, 10),
        )

    def forward(self, ids):
        return self.out(self.rnn(self.emb(ids))[0][:, -1])


def torch_batch(kind: str):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (64,), generator=g)
    if kind == "mlp":
        return torch.randn(64, 784, generator=g), y
    if kind == "cnn":
        return torch.randn(64, 1, 28, 28, generator=g), y
    return torch.randint(0, 100, (64, 20), generator=g), y


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def bench_torch_checks(repeats: int) -> None:
    from gradwatch.torch.checker import TorchChecker
    from gradwatch.torch.twin import cast_batch

    for name, factory, kind in (
        ("MLP 784-256-256-10", MLP, "mlp"),
        ("CNN + BN + dropout", CNN, "cnn"),
        ("2-layer LSTM", LSTM, "seq"),
    ):
        torch.manual_seed(0)
        model = factory()
        batch = torch_batch(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, batch=batch, opt=opt):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()

        coord = TorchChecker(model, loss_fn, mode="coordinate")
        looped = TorchChecker(model, loss_fn, mode="coordinate", vectorize=False)
        direc = TorchChecker(model, loss_fn, mode="directional")
        for _ in range(3):  # as in a callback: the first checks choose vmap or the loop per tensor
            coord.check(batch)
            direc.check(batch)
        twin = coord.twin().module
        b64 = cast_batch(batch, torch.float64, None)
        n_coord = 2 * 32
        n_dir = 2 * len(coord.names)

        def forwards(n, twin=twin, b64=b64):
            def run(twin=twin, b64=b64, n=n):
                with torch.no_grad():
                    for _ in range(n):
                        loss_fn(twin, b64)

            return run

        alarms: list[bool] = []

        def gradcheck_fast(twin=twin, b64=b64, alarms=alarms):
            ps = [p.detach().clone().requires_grad_(True) for p in twin.parameters()]
            names = [n for n, _ in twin.named_parameters()]

            def f(*params):
                with torch.random.fork_rng(devices=[]):  # same dropout mask in every evaluation
                    torch.manual_seed(0)
                    return loss_fn(
                        lambda x: torch.func.functional_call(
                            twin, dict(zip(names, params, strict=False)), (x,)
                        ),
                        b64,
                    )

            # When the fast check fails, gradcheck recomputes the full numerical Jacobian to
            # explain (hours on a CNN): time the fast check only, and count the failure.
            gc = sys.modules["torch.autograd.gradcheck"]

            def no_slow_mode(*args, **kwargs):
                raise gc.GradcheckError("fast check failed")

            saved = gc._run_slow_mode_and_get_error
            gc._run_slow_mode_and_get_error = no_slow_mode
            try:
                ok = torch.autograd.gradcheck(
                    f, ps, fast_mode=True, eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=False
                )
            except gc.GradcheckError:
                ok = False
            finally:
                gc._run_slow_mode_and_get_error = saved
            alarms.append(not ok)

        t = interleaved(
            {
                "step": step,
                "coord": lambda c=coord, b=batch: c.check(b),
                "loop": lambda c=looped, b=batch: c.check(b),
                "dir": lambda c=direc, b=batch: c.check(b),
                "fw_coord": forwards(n_coord),
                "fw_dir": forwards(n_dir),
                "gradcheck": gradcheck_fast,
            },
            repeats,
        )
        row(f"torch {name}: coordinate check / training step", f"{t['coord'] / t['step']:.1f}x")
        row(
            f"torch {name}: coordinate check / its {n_coord} float64 forwards",
            f"{t['coord'] / t['fw_coord']:.2f}x",
            "goal <= 1.3; " + _paths(coord),
        )
        row(
            f"torch {name}: same, one evaluation at a time (vectorize=False)",
            f"{t['loop'] / t['fw_coord']:.2f}x",
        )
        row(f"torch {name}: directional check / training step", f"{t['dir'] / t['step']:.1f}x")
        row(
            f"torch {name}: directional check / its {n_dir} float64 forwards",
            f"{t['dir'] / t['fw_dir']:.2f}x",
            "goal <= 1.3",
        )
        row(
            f"torch {name}: gradcheck(fast_mode) / training step",
            f"{t['gradcheck'] / t['step']:.1f}x",
            f"one global direction; false alarms {sum(alarms)}/{len(alarms)}",
        )


def bench_float64_guard(repeats: int) -> None:
    """Check time with the float64 guard (``gradwatch.torch.precision``) against without it."""
    from lightning.pytorch.demos import Transformer

    from gradwatch.torch.checker import TorchChecker

    def demo_loss(model, batch):
        inputs, target = batch
        return F.nll_loss(model(inputs, target), target.view(-1))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (8, 36), generator=g)
    tiny = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    tiny_batch = (torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g))
    for name, model, batch, loss in (
        ("MLP 12-16-4 (batch 16)", tiny, tiny_batch, loss_fn),
        ("MLP 784-256-256-10", MLP(), torch_batch("mlp"), loss_fn),
        (
            "Lightning demo Transformer (d=64, 2+2 layers, vocab 1000, 8x35)",
            Transformer(vocab_size=1000, ninp=64, nhead=2, nhid=128, nlayers=2),
            (ids[:, :-1].contiguous(), ids[:, 1:].contiguous()),
            demo_loss,
        ),
    ):
        guarded = TorchChecker(model, loss)
        bare = TorchChecker(model, loss)
        bare.float64_guard = False
        for _ in range(3):  # as in a callback: the first checks choose vmap or the loop
            guarded.check(batch)
            bare.check(batch)
        t = interleaved(
            {
                "on": lambda c=guarded, b=batch: c.check(b),
                "off": lambda c=bare, b=batch: c.check(b),
            },
            repeats,
        )
        row(
            f"torch {name}: check with the float64 guard / without",
            f"{t['on'] / t['off']:.2f}x",
            f"{1e3 * t['on']:.0f} ms vs {1e3 * t['off']:.0f} ms; " + _paths(guarded),
        )


def _paths(checker) -> str:
    plans = checker.batching.values()
    vm = sum(p.mode == "vmap" for p in plans)
    return f"vmap for {vm} of {len(checker.names)} tensors"


class HookClock:
    """Wraps a callback's per-step hooks and adds up the time spent inside them."""

    def __init__(self, callback, names):
        self.seconds = 0.0
        for name in names:
            fn = getattr(callback, name)

            def timed(*a, _fn=fn, **k):
                t = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t

            setattr(callback, name, timed)


def fit_shares(fit, callback, hooks, runs: int = 3) -> dict[str, float]:
    """Interleaved fits without, with norms only, and with defaults: medians of wall time and of
    the share of it spent inside the callback's hooks and in its checks."""
    out: dict[str, list[float]] = {
        k: [] for k in ("plain", "norms", "defaults", "hooks_norms", "hooks", "checks", "count")
    }
    for _ in range(runs):
        out["plain"].append(fit([]))
        for key, share, cb in (
            ("norms", "hooks_norms", callback(enable_checks=False)),
            ("defaults", "hooks", callback()),
        ):
            clock = HookClock(cb, hooks)
            out[key].append(fit([cb]))
            out[share].append(clock.seconds / out[key][-1])
        out["checks"].append(sum(r.seconds for r in cb.reports) / out["defaults"][-1])
        out["count"].append(len(cb.reports))
    return {k: statistics.median(v) for k, v in out.items()}


def bench_torch_norms(repeats: int) -> None:
    from lightning.pytorch.utilities import grad_norm

    from gradwatch.lightning.norms import GradNorms

    torch.manual_seed(0)
    model = MLP()
    batch = torch_batch("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    named = list(model.named_parameters())

    def step():
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()

    def ours():
        GradNorms.norms([(n, p.grad) for n, p in named])

    def lightning_util():
        grad_norm(model, norm_type=2)

    def loop():
        {n: p.grad.norm().item() for n, p in named}

    step()
    t = interleaved(
        {"step": step, "ours": ours, "lightning": lightning_util, "loop": loop}, repeats * 20
    )
    row(
        "torch MLP: gradwatch norms (fused, one transfer) / step",
        f"{100 * t['ours'] / t['step']:.2f}%",
        "goal <= 3%",
    )
    row("torch MLP: Lightning grad_norm utility / step", f"{100 * t['lightning'] / t['step']:.2f}%")
    row("torch MLP: Python loop of .norm().item() / step", f"{100 * t['loop'] / t['step']:.2f}%")


def lightning_fit(callbacks, steps: int) -> float:
    """Seconds of one Lightning ``fit`` of the MLP on repeated batches (no logger, CPU)."""
    import logging
    import warnings

    import lightning as L

    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = MLP()

        def training_step(self, batch, i):
            return loss_fn(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x, y = torch_batch("mlp")
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x.repeat(8, 1), y.repeat(8)), batch_size=64
    )
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=100_000,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(Module(), data)
    return time.perf_counter() - start


def keras_mlp():
    """The Keras MLP 784-256-256-10 with SGD, seeded; TensorFlow's threads pinned."""
    import keras
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):  # fixed once TensorFlow has started
        tf.config.threading.set_intra_op_parallelism_threads(THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(THREADS)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def budget_row(label: str, reports, seconds: float) -> None:
    """The checks' share of a run, with each check's time and evaluations."""
    row(
        f"{label}, defaults: checks' share of the run",
        f"{100 * sum(r.seconds for r in reports) / seconds:.2f}%",
        f"max_overhead 2%; {len(reports)} checks: "
        + ", ".join(f"{r.seconds:.2f}s/{r.evaluations} evaluations" for r in reports),
    )


def bench_lightning_fit(steps: int) -> None:
    from gradwatch.lightning import GradWatch

    def fit(callbacks):
        return lightning_fit(callbacks, steps)

    m = fit_shares(
        fit, GradWatch, ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
    )
    row(
        f"Lightning fit, {steps} steps: time inside GradWatch's hooks, norms only",
        f"{100 * m['hooks_norms']:.1f}%",
        f"goal <= 3%; step {1e3 * m['plain'] / steps:.2f} ms",
    )
    row(
        f"Lightning fit, {steps} steps, defaults: time inside GradWatch's hooks",
        f"{100 * m['hooks']:.1f}%",
        f"goal <= 5%; of which checks {100 * m['checks']:.1f}% ({m['count']:.0f} checks, "
        f"budget 2%)",
    )
    row(
        f"Lightning fit, {steps} steps, defaults: wall-clock overhead",
        f"{100 * (m['defaults'] / m['plain'] - 1):.1f}%",
        f"norms only {100 * (m['norms'] / m['plain'] - 1):.1f}%; 3 interleaved runs, noisy",
    )


def bench_keras(repeats: int, steps: int) -> None:
    import keras
    import tensorflow as tf

    from gradwatch.keras import GradWatch
    from gradwatch.keras.checker import KerasChecker
    from gradwatch.keras.problem import _Problem

    model = keras_mlp()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 784)).astype("float32")
    y = rng.integers(0, 10, 64)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    train = model.make_train_function()
    ds = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

    def step():
        train(ds)

    compiled = KerasChecker(model)
    eager = KerasChecker(model)
    eager.loss_at = eager._loss_eager  # type: ignore[method-assign]

    second_tape_vars = model.trainable_variables

    @tf.function
    def second_tape():
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True), training=True)
        return [tf.norm(g) for g in tape.gradient(loss, second_tape_vars)]

    p = _Problem(compiled, (x, y, None), 0)
    vals = [keras.ops.convert_to_tensor(a) for a in p._values]

    def forwards():
        for _ in range(64):
            p._loss(vals)

    t = interleaved(
        {
            "step": step,
            "compiled": lambda: compiled.check(x, y),
            "eager": lambda: eager.check(x, y),
            "fw": forwards,
            "tape": second_tape,
        },
        repeats,
    )
    row("Keras MLP: compiled check / training step", f"{t['compiled'] / t['step']:.1f}x")
    row(
        "Keras MLP: compiled check / its 64 float64 losses",
        f"{t['compiled'] / t['fw']:.2f}x",
        "goal <= 1.3",
    )
    row("Keras MLP: eager-loop check / training step", f"{t['eager'] / t['step']:.1f}x")
    row(
        "Keras MLP: a second gradient tape for norms / step",
        f"{100 * t['tape'] / t['step']:.0f}%",
        "the alternative",
    )

    def fit(callbacks):
        m = keras_mlp()
        xs, ys = np.repeat(x, steps // 10, axis=0), np.repeat(y, steps // 10)
        start = time.perf_counter()
        m.fit(xs, ys, batch_size=64, epochs=10, verbose=0, callbacks=callbacks)
        return time.perf_counter() - start

    # In-graph cost of the norms: the train function with and without them installed.
    with_norms = keras_mlp()
    with_norms.fit(x, y, batch_size=64, epochs=1, verbose=0)
    installed = GradWatch(enable_checks=False)
    installed.set_model(with_norms)
    installed.on_train_begin()
    train_norms = with_norms.train_function
    t = interleaved({"step": step, "norms": lambda: train_norms(ds)}, repeats * 30)
    row(
        "Keras MLP: train step with gradwatch's in-graph norms / plain step",
        f"{100 * (t['norms'] / t['step'] - 1):.1f}%",
        "one fused l2_loss per tensor, a device ring read every 16 steps",
    )

    m = fit_shares(fit, GradWatch, ("on_train_batch_begin", "on_train_batch_end"))
    row(
        f"Keras fit, {steps} steps: time inside GradWatch's hooks, norms only",
        f"{100 * m['hooks_norms']:.1f}%",
        f"step {1e3 * m['plain'] / steps:.2f} ms; plus the in-graph norms above",
    )
    row(
        f"Keras fit, {steps} steps, defaults: time inside GradWatch's hooks",
        f"{100 * m['hooks']:.1f}%",
        f"of which checks {100 * m['checks']:.1f}% ({m['count']:.0f} checks, budget 2%)",
    )
    row(
        f"Keras fit, {steps} steps, defaults: wall-clock overhead",
        f"{100 * (m['defaults'] / m['plain'] - 1):.1f}%",
        f"goal <= 5%; norms only {100 * (m['norms'] / m['plain'] - 1):.1f}%; 3 interleaved "
        f"runs, noisy",
    )


def bench_budget(steps: int) -> None:
    """One long run per framework at defaults: the checks' share of training time."""
    from gradwatch.lightning import GradWatch

    cb = GradWatch()
    seconds = lightning_fit([cb], steps)
    budget_row(f"Lightning fit, {steps} steps", cb.reports, seconds)
    try:
        import keras  # noqa: F401
    except ImportError:
        return
    from gradwatch.keras import GradWatch as KerasWatch

    x, y = (t.numpy() for t in torch_batch("mlp"))
    model = keras_mlp()
    kcb = KerasWatch()
    start = time.perf_counter()
    model.fit(
        x.repeat(steps // 10, axis=0),
        y.repeat(steps // 10),
        batch_size=64,
        epochs=10,
        verbose=0,
        callbacks=[kcb],
    )
    budget_row(f"Keras fit, {steps} steps", kcb.reports, time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    ap.add_argument("--write", metavar="FILE", help="write the table as Markdown")
    ap.add_argument("--skip-keras", action="store_true")
    ap.add_argument("--only-budget", action="store_true", help="only the long runs")
    ap.add_argument("--only-guard", action="store_true", help="only the float64 guard's cost")
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    steps = 500 if args.quick else 2000
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {THREADS} thread(s)"
    )
    print(f"gradwatch benchmarks — {machine}; torch {torch.__version__}\n")
    if args.only_guard:
        bench_float64_guard(repeats)
        return
    if not args.only_budget:
        bench_torch_checks(repeats)
        bench_float64_guard(repeats)
        bench_torch_norms(repeats)
        bench_lightning_fit(steps)
        if not args.skip_keras:
            bench_keras(repeats, steps)
    bench_budget(2_000 if args.quick else 20_000)
    if args.write:
        lines = [
            f"Measured on: {machine}, torch {torch.__version__}; medians of interleaved runs.",
            "",
            "| measurement | ratio | note |",
            "|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in ROWS]
        Path(args.write).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
