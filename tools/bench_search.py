"""Benchmark successive halving inside the bank (``inca-train --search halving``) against the full grid.

Per task, both searches train the same grid (every layer x 4 learning rates x queries {1, 4} x 2 weight decays:
64 adapters on the demo's 4-block ViT, 96 on the 6-block proxy) for 9 epochs, through the same function as
``inca-train`` (:func:`inca.train.runner.train_inca_task`: train, validate each epoch, select on val, evaluate on
test, save), from the same activation store, built before anything is timed. The two runs of a task are
interleaved (their order alternates from task to task and repeat to repeat) so that a machine shared with other
work slows both alike; each reports its median wall time over ``--repeats``. Per task it prints the wall times,
the adapter-epochs spent, and the selected adapter's val and test accuracy; where halving selects another adapter
than the grid, where the grid's choice stopped in the halving run and how it stood there.

The demo backbone and tasks come from ``recipes/demo.yaml`` (random weights: the accuracies are those of adapters
on frozen random features). With the pretrained proxy of ``docs/results.md`` present (``--proxy-weights``, made by
``tools/pretrain_proxy.py``), the same comparison runs on it.

    OMP_NUM_THREADS=1 python tools/bench_search.py
    OMP_NUM_THREADS=1 python tools/bench_search.py --tasks digits --repeats 3 --skip-proxy
    OMP_NUM_THREADS=1 python tools/bench_search.py --skip-demo      # the proxy backbone alone
    OMP_NUM_THREADS=1 python tools/bench_search.py --skip-proxy --json runs/bench-search-demo.json   # docs/results.md's
    OMP_NUM_THREADS=1 python tools/bench_search.py --skip-demo --json runs/bench-search-proxy.json   # two runs
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from inca.activations import open_source
from inca.backbone import Backbone, create_backbone, resolve_layers
from inca.io import atomic_write_json
from inca.report import markdown_table
from inca.tasks import Task, load_task
from inca.train.config import InCATrainConfig
from inca.train.runner import train_inca_task

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
PROXY_KWARGS = ["img_size=32", "patch_size=8", "depth=6"]  # docs/results.md's proxy
SEARCHES = ("grid", "halving")
BACKBONES = {"demo": "random weights, recipes/demo.yaml", "proxy": "docs/results.md's pretrained proxy"}


def run_once(backbone: Backbone, task: Task, layers: list[int], config: InCATrainConfig, work: Path) -> dict:
    """One search on one task: its wall time and results."""
    start = time.perf_counter()
    result = train_inca_task(backbone, task, layers, config, work)
    return {**result, "wall": time.perf_counter() - start}


def compare_task(backbone: Backbone, task: Task, configs: dict[str, InCATrainConfig], repeats: int, first: int,
                 work: Path) -> dict[str, dict]:
    """Both searches on ``task``, interleaved; per search its last results and median wall time."""
    layers = resolve_layers("all", backbone.num_blocks)
    open_source(backbone, task, layers, epochs=2, cache="always", cache_dir=configs["grid"].cache_dir)  # untimed
    walls: dict[str, list[float]] = {search: [] for search in SEARCHES}
    results: dict[str, dict] = {}
    for repeat in range(repeats):
        order = SEARCHES if (first + repeat) % 2 == 0 else SEARCHES[::-1]
        for search in order:
            results[search] = run_once(backbone, task, layers, configs[search], work / f"{search}-{repeat}")
            walls[search].append(results[search]["wall"])
    for search in SEARCHES:
        results[search]["wall"] = statistics.median(walls[search])
    return results


def why_it_differs(grid: dict, halving: dict) -> str:
    """Where the grid's selected adapter stopped in the halving run, and how it stood there."""
    index = grid["best"]["index"]
    if halving["best"]["index"] == index:
        return "same adapter"
    theirs = halving["adapters"][index]
    pick = halving["adapters"][halving["best"]["index"]]
    name = f"layer {theirs['layer']}, lr {theirs['lr']:g}, {theirs['num_queries']}q, wd {theirs['weight_decay']:g}"
    if theirs["stopped_rung"] is None:
        return (f"the grid's pick ({name}) survived every rung; halving picked layer {pick['layer']}, lr "
                f"{pick['lr']:g} on a val tie or better")
    return (f"the grid's pick ({name}) was pruned at rung {theirs['stopped_rung']} (after epoch "
            f"{theirs['epochs_trained']}, best val {theirs['val_acc']:.3f}; {grid['val_acc']:.3f} after all epochs)")


def task_figures(spec: str, grid: dict, halving: dict) -> dict:
    """What ``--json`` records of one task: per search its median wall time, adapter-epochs and the selected
    adapter's accuracies, and why halving selected another adapter where it did."""
    return {"task": spec, "adapters": len(grid["adapters"]),
            **{search: {key: result[key] for key in ("wall", "adapter_epochs", "val_acc", "test_acc")}
               for search, result in (("grid", grid), ("halving", halving))},
            "selected": why_it_differs(grid, halving)}


def bench(backbone: Backbone, tasks: list[str], args: argparse.Namespace, work: Path) -> list[dict]:
    """The comparison on ``backbone``: :func:`task_figures` of each task."""
    base = dict(lr=args.lr, queries=args.queries, weight_decay=args.weight_decay, epochs=args.epochs,
                batch_size=args.batch_size, cache="always", cache_dir=str(work / "cache"))
    configs = {"grid": InCATrainConfig(**base),
               "halving": InCATrainConfig(**base, search="halving", halving_rate=args.halving_rate)}
    figures = []
    for first, spec in enumerate(tasks):
        results = compare_task(backbone, load_task(spec), configs, args.repeats, first, work / spec)
        figures.append(task_figures(spec, results["grid"], results["halving"]))
        logging.getLogger(__name__).warning("%s done: grid %.1fs, halving %.1fs", spec, results["grid"]["wall"],
                                            results["halving"]["wall"])
    return figures


def summary(figures: list[dict]) -> dict[str, float]:
    """Over the tasks: halving's total wall time over the grid's, and each search's mean test accuracy."""
    wall = {search: sum(t[search]["wall"] for t in figures) for search in SEARCHES}
    return {"wall_ratio": wall["halving"] / wall["grid"],
            **{f"{search}_test": statistics.mean(t[search]["test_acc"] for t in figures) for search in SEARCHES}}


def table(figures: list[dict]) -> str:
    """The printed Markdown table of :func:`bench`'s figures."""
    rows = [[t["task"], t["adapters"], f"{t['grid']['wall']:.1f}", f"{t['halving']['wall']:.1f}",
             f"{t['halving']['wall'] / t['grid']['wall']:.2f}x", t["grid"]["adapter_epochs"],
             t["halving"]["adapter_epochs"], f"{t['grid']['val_acc']:.3f} / {t['grid']['test_acc']:.3f}",
             f"{t['halving']['val_acc']:.3f} / {t['halving']['test_acc']:.3f}", t["selected"]] for t in figures]
    total = summary(figures)
    rows.append(["**all**", "", "", "", f"{total['wall_ratio']:.2f}x", "", "", f"mean test {total['grid_test']:.3f}",
                 f"mean test {total['halving_test']:.3f}", ""])
    return markdown_table(
        ["task", "adapters", "grid s", "halving s", "halving / grid", "grid adapter-epochs",
         "halving adapter-epochs", "grid: val / test", "halving: val / test", "selected"], rows,
    )  # fmt: skip


def main() -> None:
    demo = yaml.safe_load(DEMO.read_text())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(demo["tasks"]), help="default: recipes/demo.yaml's five")
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--lr", default="3e-3,1e-3,3e-4,1e-4")
    parser.add_argument("--queries", default="1,4")
    parser.add_argument("--weight-decay", default="1e-4,1e-2")
    parser.add_argument("--halving-rate", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=demo["batch_size"])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each search per task (median wall time)")
    parser.add_argument("--proxy-weights", default=str(ROOT / "runs" / "proxy" / "model.safetensors"),
                        help="docs/results.md's pretrained proxy (tools/pretrain_proxy.py); skipped when absent")
    parser.add_argument("--skip-proxy", action="store_true")
    parser.add_argument("--skip-demo", action="store_true", help="the proxy backbone alone")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here (tools/proxy_results.py reads it)")
    args = parser.parse_args()
    for key in ("lr", "weight_decay"):
        setattr(args, key, [float(v) for v in getattr(args, key).split(",")])
    args.queries = [int(v) for v in args.queries.split(",")]
    tasks = args.tasks.split(",")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    backbones = {} if args.skip_demo else {"demo": lambda: create_backbone(
        demo["backbone"], demo["weights"], demo["model_kwargs"])}
    if not args.skip_proxy and Path(args.proxy_weights).is_file():
        backbones["proxy"] = lambda: create_backbone(demo["backbone"], args.proxy_weights, PROXY_KWARGS)
    elif not args.skip_proxy:
        print(f"proxy weights {args.proxy_weights} absent (tools/pretrain_proxy.py makes them): demo backbone only\n")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in backbones.items():
            figures[name] = bench(make(), tasks, args, Path(tmp) / name)
            total = summary(figures[name])
            print(f"## {name} ({BACKBONES[name]}): {args.epochs} epochs, halving rate {args.halving_rate}\n\n"
                  f"{table(figures[name])}\n")
            print(f"wall time halving / grid: {total['wall_ratio']:.2f}x; mean test accuracy of the selected "
                  f"adapter: {100 * (total['halving_test'] - total['grid_test']):+.1f} points with halving\n")
    if args.json:
        settings = {key: getattr(args, key) for key in ("epochs", "lr", "queries", "weight_decay", "halving_rate",
                                                         "batch_size", "repeats")}
        atomic_write_json(Path(args.json), {"settings": settings, "threads": torch.get_num_threads(),
                                            "backbones": figures})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
