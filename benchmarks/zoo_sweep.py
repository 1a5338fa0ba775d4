"""False alarms on healthy models and bugs caught, over many seeds; and check cost in train steps.

Run: python benchmarks/zoo_sweep.py [--seeds 20] [--no-cost]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.torch_zoo import CNN, MLP, bugs, classify, make_batch, zoo

from gradwatch.torch import check_gradients


def sweep(seeds: int) -> None:
    for mode in ("coordinate", "directional"):
        runs = fails = inconclusive = 0
        worst = 0.0
        for seed in range(seeds):
            for _name, model, kind in zoo(seed):
                r = check_gradients(model, make_batch(kind, seed), classify, mode=mode, seed=seed)
                runs += 1
                fails += r.verdict == "fail"
                inconclusive += r.verdict == "inconclusive"
                worst = max(worst, r.max_rel_error or 0.0)
        print(
            f"healthy zoo, {mode:11s}: {fails} false alarms / {runs} runs, "
            f"{inconclusive} inconclusive, worst rel error {worst:.2g}"
        )
        caught = total = 0
        for seed in range(seeds):
            for _name, factory, kind, param in bugs():
                torch.manual_seed(seed)
                r = check_gradients(
                    factory(), make_batch("mlp", seed), classify, mode=mode, seed=seed
                )
                total += 1
                caught += (kind, param) in [(e.kind, e.param) for e in r.events]
        print(f"injected bugs, {mode:11s}: {caught} caught / {total} runs (right kind and tensor)")


def cost(repeats: int = 7) -> None:
    torch.set_num_threads(1)
    for name, model, kind in (("MLP", MLP(), "mlp"), ("CNN", CNN(), "cnn")):
        batch = make_batch(kind, 0, n=64)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def train_step(model=model, batch=batch, opt=opt) -> None:  # type: ignore[no-untyped-def]
            opt.zero_grad()
            classify(model, batch).backward()
            opt.step()

        for mode in ("coordinate", "directional"):
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
            print(f"{name} {mode:11s}: one default check = {ratio:.1f} training steps (1 thread)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--no-cost", action="store_true", help="skip the cost measurement")
    args = ap.parse_args()
    sweep(args.seeds)
    if not args.no_cost:
        cost()
