"""False alarms on healthy models and bugs caught and localized, over many seeds; and check cost.

Three parts:

- ``zoo``: the curated zoo (``tests/helpers/torch_zoo.py``): false alarms over healthy models and
  injected bugs caught (right kind and tensor), in both check modes; each injected bug also
  localized (``gradwatch.torch.localize``: culprit == the module holding the bug).
- ``library``: models written the way public model libraries write them
  (``benchmarks/library_zoo.py``: a Llama-style causal LM with an RMSNorm that casts to float32,
  a causal mask and rotary positions made in ``forward``, tied embeddings and a loss on
  ``logits.float()``; a BERT-style classifier whose LayerNorm computes its variance in float32; a
  BCE classifier on ``y.float()``; a diffusion-style step drawing ``t = torch.rand(B)``): false
  alarms and false culprits on healthy models, planted bugs (×0.9 activation backward, a
  normalisation's backward with a dropped term, a detached parameter) caught with the right kind,
  localized to the right module, and the time of ``localize`` against a default check.
- ``cost``: one default check in training steps.

Every false alarm, miss and wrong culprit is listed with its model, seed, tensor and error.

Run: python benchmarks/zoo_sweep.py [--quick] [--seeds 20] [--parts zoo,library,cost]
[--modes coordinate,directional,modules]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.library_zoo import BUG_KINDS, cases
from tests.helpers.torch_zoo import CNN, MLP, bugs, classify, make_batch, zoo

from gradwatch import CheckReport, LocalizationReport
from gradwatch.torch import check_gradients, localize
from gradwatch.torch.checker import TorchChecker

MODES = ("coordinate", "directional", "modules")

#: Curated-zoo bug → the module ``localize`` must name (``BuggyNet``: ``first`` or ``act``).
ZOO_CULPRITS = {
    "scaled-0.98": "first",
    "scaled-0.9": "first",
    "sign-flip-bias": "first",
    "missing-bias-grad": "first",
    "missing-term": "act",
    "wrong-derivative": "act",
    "detach": "first",
    "item-leak": "first",
}

#: Problems found, printed in detail at the end.
FINDINGS: list[str] = []


def table(header: list[str], rows: list[list[Any]]) -> None:
    """A Markdown table (what docs/performance.md holds)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def failures(r: CheckReport) -> str:
    """The failing entries of a report: tensor, status, relative error."""
    parts = [
        f"{e.param} {e.status} rel {e.rel_error:.3g}"
        if e.rel_error is not None
        else f"{e.param} {e.status}"
        for e in r.failed
    ]
    return "; ".join(parts) or ", ".join(f"{e.kind} {e.param}" for e in r.events) or "none"


def caught(r: CheckReport, kind: str, param: str | None, module: str) -> bool:
    """Whether ``r`` raised an event of ``kind`` (on ``param``, when given); in
    ``mode="modules"``: a failure event naming ``module``, the module that holds the bug."""
    if r.mode == "modules":
        return any(e.kind in ("mismatch", "disconnected") and e.module == module for e in r.events)
    return any(e.kind == kind and (param is None or e.param == param) for e in r.events)


def unguarded(model: torch.nn.Module, batch: Any, loss: Any, mode: str, seed: int) -> str:
    """The verdict of the same check with the float64 guard switched off (a control)."""
    checker = TorchChecker(model, loss, mode=mode, seed=seed)
    checker.float64_guard = False
    try:
        r = checker.check(batch)
    except Exception as exc:  # a dtype clash in the unguarded copy
        return f"error ({type(exc).__name__})"
    if any(e.kind == "unchecked" for e in r.events):
        return "unchecked"
    return r.verdict


def located(loc: LocalizationReport, where: str) -> str:
    return f"culprit {loc.culprit!r} (culprits {list(loc.culprits)}), expected {where!r}"


# --- the curated zoo ------------------------------------------------------------------------------


def sweep(seeds: int, modes: tuple[str, ...]) -> None:
    print(f"## curated zoo ({seeds} seeds)\n")
    rows = []
    loc_right: dict[str, int] = defaultdict(int)
    loc_caught: dict[str, int] = defaultdict(int)
    check_s: list[float] = []
    loc_s: list[float] = []
    for mode in modes:
        runs = fails = inconclusive = 0
        worst = 0.0
        for seed in range(seeds):
            for name, model, kind in zoo(seed):
                r = check_gradients(model, make_batch(kind, seed), classify, mode=mode, seed=seed)
                runs += 1
                fails += r.verdict == "fail"
                inconclusive += r.verdict == "inconclusive"
                worst = max(worst, r.max_rel_error or 0.0)
                if r.verdict == "fail":
                    FINDINGS.append(f"false alarm: zoo {name}, {mode}, seed {seed}: {failures(r)}")
        found = total = 0
        for seed in range(seeds):
            for name, factory, kind, param in bugs():
                torch.manual_seed(seed)
                model = factory()
                batch = make_batch("mlp", seed)
                r, seconds = timed(check_gradients, model, batch, classify, mode=mode, seed=seed)
                total += 1
                hit = caught(r, kind, param, ZOO_CULPRITS[name])
                found += hit
                if not hit:
                    FINDINGS.append(
                        f"miss: zoo {name}, {mode}, seed {seed}: verdict {r.verdict}, "
                        f"expected {kind} on {param}, got {failures(r)}"
                    )
                if mode == "coordinate" and hit:
                    loc, loc_seconds = timed(localize, model, batch, classify, seed=seed)
                    check_s.append(seconds)
                    loc_s.append(loc_seconds)
                    loc_caught[name] += 1
                    right = loc.culprit == ZOO_CULPRITS[name]
                    loc_right[name] += right
                    if not right:
                        FINDINGS.append(
                            f"wrong module: zoo {name}, seed {seed}: "
                            f"{located(loc, ZOO_CULPRITS[name])}"
                        )
        rows.append([mode, f"{fails}/{runs}", inconclusive, f"{worst:.2g}", f"{found}/{total}"])
    table(
        ["mode", "false alarms", "inconclusive", "worst rel err", "bugs caught (kind, tensor)"],
        rows,
    )
    table(
        ["injected bug", "module", "localized (right module / caught)"],
        [[n, ZOO_CULPRITS[n], f"{loc_right[n]}/{loc_caught[n]}"] for n in ZOO_CULPRITS],
    )
    check, loc = statistics.median(check_s), statistics.median(loc_s)
    print(
        f"curated-zoo bugs (BuggyNet 12-16-4), median over the caught runs: default check "
        f"{check * 1e3:.0f} ms, localize {loc * 1e3:.0f} ms ({loc / check:.1f}x)\n"
    )


# --- library-style models -------------------------------------------------------------------------


def library(seeds: int, modes: tuple[str, ...]) -> None:
    print(f"## library-style models ({seeds} seeds; localize on every run)\n")
    healthy_rows = []
    for case in cases():
        for mode in modes:
            fails = inconclusive = false_culprits = 0
            worst = 0.0
            control: Counter[str] = Counter()
            for seed in range(seeds):
                model, batch = case.build(seed), case.batch(seed)
                r = check_gradients(model, batch, case.loss, mode=mode, seed=seed)
                fails += r.verdict == "fail"
                inconclusive += r.verdict == "inconclusive"
                worst = max(worst, r.max_rel_error or 0.0)
                if r.verdict == "fail":
                    FINDINGS.append(f"false alarm: {case.name}, {mode}, seed {seed}: {failures(r)}")
                if r.verdict == "inconclusive":
                    FINDINGS.append(
                        f"inconclusive: {case.name}, {mode}, seed {seed}: {list(r.notes)}"
                    )
                if mode != "modules":  # local checks always run under the guard
                    control[unguarded(model, batch, case.loss, mode, seed)] += 1
                if mode == modes[0]:
                    loc = localize(model, batch, case.loss, seed=seed)
                    if loc.culprit is not None:
                        false_culprits += 1
                        FINDINGS.append(f"false culprit: {case.name}, seed {seed}: {loc.summary}")
            healthy_rows.append(
                [
                    case.name,
                    mode,
                    f"{fails}/{seeds}",
                    inconclusive,
                    f"{worst:.2g}",
                    f"{false_culprits}/{seeds}" if mode == modes[0] else "",
                    ", ".join(f"{n} {v}" for v, n in sorted(control.items())),
                ]
            )
    table(
        [
            "healthy model",
            "mode",
            "false alarms",
            "inconclusive",
            "worst rel err",
            "false culprits",
            "control: guard off",
        ],
        healthy_rows,
    )

    by_kind: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (kind, mode)
    # bug kind → [right module among caught, caught, right module, runs] (default mode)
    loc_by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    check_s: dict[str, list[float]] = defaultdict(list)
    loc_s: dict[str, list[float]] = defaultdict(list)
    bug_rows = []
    for case in cases():
        for bug in BUG_KINDS:
            kind, param = case.expected(bug)
            where = case.culprit(bug)
            per_mode = []
            right = done = right_all = 0
            for mode in modes:
                hits = 0
                for seed in range(seeds):
                    model, batch = case.build(seed, bug), case.batch(seed)
                    r, seconds = timed(
                        check_gradients, model, batch, case.loss, mode=mode, seed=seed
                    )
                    hit = caught(r, kind, param, where)
                    hits += hit
                    by_kind[bug, mode][0] += hit
                    by_kind[bug, mode][1] += 1
                    if not hit:
                        FINDINGS.append(
                            f"miss: {case.name} {bug}, {mode}, seed {seed}: verdict {r.verdict}, "
                            f"expected {kind} on {param or 'any tensor'}, got {failures(r)}"
                        )
                    if mode != modes[0]:
                        continue
                    check_s[case.name].append(seconds)
                    loc, seconds = timed(localize, model, batch, case.loss, seed=seed)
                    loc_s[case.name].append(seconds)
                    right_all += loc.culprit == where
                    if hit:
                        done += 1
                        right += loc.culprit == where
                    if loc.culprit != where:
                        FINDINGS.append(
                            f"wrong module: {case.name} {bug}, seed {seed}: {located(loc, where)}"
                            f"; {loc.summary}"
                        )
                per_mode.append(f"{hits}/{seeds}")
            for k, n in enumerate((right, done, right_all, seeds)):
                loc_by_kind[bug][k] += n
            bug_rows.append(
                [case.name, bug, where, *per_mode, f"{right}/{done}", f"{right_all}/{seeds}"]
            )
    localized = [f"localized / caught ({modes[0]})", "localized / runs"]
    table(
        ["model", "planted bug", "module", *(f"caught, {m}" for m in modes), *localized],
        bug_rows,
    )
    table(
        ["bug kind", *(f"caught, {m}" for m in modes), *localized],
        [
            [
                bug,
                *(f"{by_kind[bug, m][0]}/{by_kind[bug, m][1]}" for m in modes),
                "{}/{}".format(*loc_by_kind[bug][:2]),
                "{}/{}".format(*loc_by_kind[bug][2:]),
            ]
            for bug in BUG_KINDS
        ],
    )
    rows = []
    for case in cases():
        check, loc = statistics.median(check_s[case.name]), statistics.median(loc_s[case.name])
        params = sum(p.numel() for p in case.build(0).parameters())
        rows.append(
            [
                case.name,
                params,
                f"{check * 1e3:.0f} ms",
                f"{loc * 1e3:.0f} ms",
                f"{loc / check:.1f}x",
            ]
        )
    table(
        ["model", "parameters", f"default check ({modes[0]})", "localize", "localize / check"],
        rows,
    )


# --- cost in training steps -----------------------------------------------------------------------


def cost(repeats: int, modes: tuple[str, ...]) -> None:
    print("## one default check in training steps (1 thread)\n")
    rows = []
    for name, model, kind in (("MLP", MLP(), "mlp"), ("CNN", CNN(), "cnn")):
        batch = make_batch(kind, 0, n=64)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def train_step(model=model, batch=batch, opt=opt) -> None:  # type: ignore[no-untyped-def]
            opt.zero_grad()
            classify(model, batch).backward()
            opt.step()

        for mode in modes:
            steps, checks = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                for _ in range(10):
                    train_step()
                steps.append((time.perf_counter() - t) / 10)
                t = time.perf_counter()
                check_gradients(model, batch, classify, mode=mode)
                checks.append(time.perf_counter() - t)
            ratio = statistics.median(checks) / statistics.median(steps)
            rows.append([name, mode, f"{ratio:.1f}"])
    table(["model", "mode", "one check / training step"], rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--seeds", type=int, default=None, help="seeds per model (default 20; 5 with --quick)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="5 seeds, 3 cost repeats: a few minutes on 2 CPU cores"
    )
    ap.add_argument("--parts", default="zoo,library,cost", help="comma-separated parts to run")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated check modes")
    ap.add_argument("--no-cost", action="store_true", help="skip the cost measurement")
    args = ap.parse_args()
    seeds = args.seeds or (5 if args.quick else 20)
    parts = set(args.parts.split(","))
    modes = tuple(args.modes.split(","))
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, 1 thread; {' '.join(sys.argv)}\n")
    if "zoo" in parts:
        sweep(seeds, modes)
    if "library" in parts:
        library(seeds, modes)
    if "cost" in parts and not args.no_cost:
        cost(3 if args.quick else 7, modes)
    print(f"## findings ({len(FINDINGS)})\n")
    for line in FINDINGS:
        print(f"- {line}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
