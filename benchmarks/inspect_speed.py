"""gradwatch's reader next to TensorBoard's EventAccumulator on one million scalar events.

The file is what torch's SummaryWriter (Lightning's TensorBoardLogger) writes: one event per scalar,
simple values; 10 gradwatch norm tags over 90,000 steps plus 100,000 events of another tag.

Run: python benchmarks/inspect_speed.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from gradwatch.inspect import load


def write(logdir: Path, n_events: int) -> None:
    w = EventFileWriter(str(logdir), max_queue_size=10_000)
    tags = [f"gradwatch/grad_norm/layer{i}.weight" for i in range(10)]
    steps = (n_events * 9 // 10) // len(tags)
    for step in range(steps):
        for i, tag in enumerate(tags):
            v = summary_pb2.Summary.Value(tag=tag, simple_value=1.0 / (1 + step + i))
            w.add_event(
                event_pb2.Event(wall_time=1.0, step=step, summary=summary_pb2.Summary(value=[v]))
            )
        if step % 9 == 0:
            for _ in range(10):
                v = summary_pb2.Summary.Value(tag="train_loss", simple_value=0.5)
                w.add_event(
                    event_pb2.Event(
                        wall_time=1.0, step=step, summary=summary_pb2.Summary(value=[v])
                    )
                )
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        logdir = Path(d)
        t = time.perf_counter()
        write(logdir, args.events)
        size = sum(f.stat().st_size for f in logdir.iterdir()) / 1e6
        print(
            f"wrote ~{args.events:,} scalar events ({size:.0f} MB) in {time.perf_counter() - t:.1f}s"
        )
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved
            t = time.perf_counter()
            runs = load(logdir)
            ours.append(time.perf_counter() - t)
            n_ours = sum(len(s) for s in runs[0].norms.values())
            t = time.perf_counter()
            acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
            acc.Reload()
            n_theirs = sum(
                len(acc.Scalars(tag))
                for tag in acc.Tags()["scalars"]
                if tag.startswith("gradwatch")
            )
            theirs.append(time.perf_counter() - t)
        assert n_ours == n_theirs, (n_ours, n_theirs)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"gradwatch.inspect.load : {a:6.2f}s  ({n_ours:,} gradwatch values)")
        print(f"EventAccumulator       : {b:6.2f}s  ({n_theirs:,} gradwatch values)")
        print(f"ratio EventAccumulator / gradwatch = {b / a:.1f}x (median of {args.repeats})")


if __name__ == "__main__":
    main()
