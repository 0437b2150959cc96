"""Benchmark ``inca-train`` on a suite of tasks: ``torchrun --nproc_per_node N`` against one process.

Both contenders run the same command (tiny random ViT, the offline tasks, store built from scratch in a fresh
``$INCA_CACHE`` each time, so the store build is timed too), interleaved, best of ``--repeats`` wall times.
The single process gets every thread (``--threads``); each of the N ranks gets ``threads / N`` (what torchrun
gives by default, at least 1). It prints both times, their ratio, and how the N-rank run's results compare
with the single process's: units are shared between ranks, each trained as one process would, so with the same
threads per process (``--threads N``, one each) they are bit-identical; with more threads in the single process
CPU kernels add in another order and accuracies may differ in a prediction or two.

Random weights: the figures time the distribution of work, nothing about accuracy. On a GPU node each rank
takes its local GPU (NCCL); pass a real ``--backbone`` and ``--weights`` there.

    python tools/bench_distributed.py --nproc 2 --threads 2
    python tools/bench_distributed.py --nproc 8 --backbone vit_base_patch16_224 --weights pretrained \\
        --model-kwargs --tasks TASKS --epochs 5          # an 8-GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IGNORED = {"seconds", "rank", "world_size", "data_parallel", "adapter_dir", "cache_path"}


def comparable(results: dict) -> dict:
    """Results without what differs by nature between runs (times, paths, which rank ran a task)."""
    return json.loads(json.dumps(results["tasks"]), object_hook=lambda d: {k: v for k, v in d.items()
                                                                            if k not in IGNORED})


def largest_difference(a: dict, b: dict) -> float:
    """The largest difference of any adapter's val or test accuracy between two runs' results."""
    return max(abs((x[k] or 0) - (y[k] or 0)) for task in a["tasks"]
               for x, y in zip(a["tasks"][task]["adapters"], b["tasks"][task]["adapters"])
               for k in ("val_acc", "test_acc"))


def run(ranks: int, threads: int, train_args: list[str], work: Path) -> tuple[float, dict]:
    """Wall time and results of one ``inca train`` on ``ranks`` processes in a fresh cache and output."""
    work.mkdir(parents=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1 \
        else [sys.executable]
    env = {**os.environ, "INCA_CACHE": str(work / "cache"), "OMP_NUM_THREADS": str(max(1, threads // ranks))}
    start = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "inca", "train", *train_args, "--out", str(work / "out"), "-q"],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads((work / "out" / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the distributed run")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for the whole run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tasks", default="synth-colour,synth-count,synth-orientation,digits")
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--model-kwargs", nargs="*", default=["img_size=32", "patch_size=8", "depth=4"])
    parser.add_argument("--layers", default="all")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    train_args = ["--backbone", args.backbone, "--weights", args.weights, "--model-kwargs", *args.model_kwargs,
                  "--tasks", args.tasks, "--layers", args.layers, "--epochs", str(args.epochs),
                  "--cache", "always", "--device", args.device]
    times: dict[int, list[float]] = {1: [], args.nproc: []}
    equal, difference = True, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            results = {}
            for ranks in times:  # interleaved: noise hits both contenders alike
                seconds, results[ranks] = run(ranks, args.threads, train_args, Path(tmp) / f"{repeat}-{ranks}")
                times[ranks].append(seconds)
            equal &= comparable(results[1]) == comparable(results[args.nproc])
            difference = max(difference, largest_difference(results[1], results[args.nproc]))
    one, many = min(times[1]), min(times[args.nproc])
    print(f"inca-train on {len(args.tasks.split(','))} tasks ({args.backbone}, {args.weights} weights, "
          f"{args.epochs} epochs, stores built), {args.threads} threads, best of {args.repeats}")
    print("| processes | wall time (s) | vs 1 process | results equal to 1 process | largest accuracy difference |")
    print("|---|---|---|---|---|")
    print(f"| 1 | {one:.1f} | 1.00x | - | - |")
    print(f"| {args.nproc} (torchrun) | {many:.1f} | {many / one:.2f}x | {'bit-identical' if equal else 'no'} | "
          f"{difference:.4f} |")


if __name__ == "__main__":
    main()
