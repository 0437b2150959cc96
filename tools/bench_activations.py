"""Benchmark where activations come from: building a store, reading it, and probing all layers at once.

Measures, on one backbone (default a random-weight ViT-S/16 at 224 px; weights do not change the timing)
and procedurally generated images (``synth-shapes`` rows, upsampled by the backbone's preprocessing):

1. cache build vs a bare forward pass over the same images and layers (target: <= 1.10x);
2. one InCA training epoch reading the store vs one reading the live backbone (target: >= 20x faster);
3. the backbone time of probing every layer (linear + kNN + InCA probes) vs one bare forward pass over the
   task's data (target: <= 1.2x), with the number of backbone forward calls for all layers and for one.

    python tools/bench_activations.py --rows 256
    python tools/bench_activations.py --backbone vit_large_patch16_224 --device cuda --rows 2048
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch

from inca.activations import CachedSource, LiveSource
from inca.adapters.inca import AdapterSpec, InCABank
from inca.backbone import create_backbone, resolve_device
from inca.cache import build_cache
from inca.probe import ProbeOptions, probe_task
from inca.tasks import SPLITS, Split, Task, image_loader, load_task, sequential_batches
from inca.train.bank import train_bank


def subset_task(spec: str, rows: int) -> Task:
    """The first ``rows`` images of a task's train split, and a fifth as many for val and test."""
    task = load_task(spec)
    sizes = {"train": rows, "val": max(1, rows // 5), "test": max(1, rows // 5)}
    splits = {name: task.splits[name].subset(np.arange(min(n, len(task.splits[name])))) for name, n in sizes.items()}
    return Task(f"{spec}[:{rows}]", task.classes, splits, {**task.identity, "rows": rows})


def bare_forward(backbone, task: Task, layers: list[int], batch_size: int, splits=("train",)) -> float:
    """Seconds for the images of ``splits`` through the backbone (loading included), outputs dropped."""
    start = time.perf_counter()
    for name in splits:
        split: Split = task.splits[name]
        for images, _ in image_loader(split, backbone.transform, sequential_batches(0, len(split), batch_size)):
            backbone.extract(images, layers)
    _sync(backbone.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_epoch(backbone, source, layers: list[int], batch_size: int, classes: int) -> float:
    specs = [AdapterSpec(layer=layer, num_heads=backbone.num_heads) for layer in layers]
    bank = InCABank(specs, backbone.width, classes)
    start = time.perf_counter()
    train_bank(bank, source, epochs=1, batch_size=batch_size, device=backbone.device, progress=False)
    _sync(backbone.device)
    return time.perf_counter() - start


class TimedExtract:
    """Wraps ``backbone.extract`` to add up the time spent in it and count its calls."""

    def __init__(self, backbone) -> None:
        self.backbone, self.inner, self.seconds, self.calls = backbone, backbone.extract, 0.0, 0

    def __enter__(self) -> TimedExtract:
        def timed(images, layers):
            start = time.perf_counter()
            out = self.inner(images, layers)
            _sync(self.backbone.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        self.backbone.extract = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.backbone.extract


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--task", default="synth-shapes")
    parser.add_argument("--rows", type=int, default=256, help="train images (val and test: a fifth each)")
    parser.add_argument("--layers", default="last:4", help="layers cached and trained on (e.g. last:4)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from inca.backbone import resolve_layers

    backbone = create_backbone(args.backbone, args.weights, device=resolve_device(args.device))
    layers = resolve_layers(args.layers, backbone.num_blocks)
    task = subset_task(args.task, args.rows)
    bs = args.batch_size
    print(f"{args.backbone} ({args.weights} weights) on {backbone.device}, {task.spec}, layers {layers}, "
          f"batch {bs}, {torch.get_num_threads()} threads; timings from random weights and synthetic images")

    bare_forward(backbone, task, layers, bs, ("val",))  # warm-up
    all_splits = tuple(SPLITS)
    forward = bare_forward(backbone, task, layers, bs, all_splits)
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache = build_cache(backbone, task, layers, cache_dir, batch_size=bs)
        build = time.perf_counter() - start
        print(f"\n1. cache build {build:.2f}s vs bare forward {forward:.2f}s over {sum(task.sizes().values())} "
              f"images: {build / forward:.3f}x (target <= 1.10x)")

        cached = CachedSource(cache, layers)
        one_epoch(backbone, cached, layers, bs, task.num_classes)  # warm the page cache
        epoch_cache = min(one_epoch(backbone, cached, layers, bs, task.num_classes) for _ in range(3))
    epoch_live = one_epoch(backbone, LiveSource(backbone, task, layers), layers, bs, task.num_classes)
    print(f"2. InCA epoch ({len(layers)} adapters) from the store {epoch_cache:.3f}s vs live backbone "
          f"{epoch_live:.2f}s: {epoch_live / epoch_cache:.1f}x faster (target >= 20x)")

    every = list(range(backbone.num_blocks))
    options = ProbeOptions(probes=["linear", "knn", "inca"], inca_epochs=3, batch_size=bs, linear_c=[1.0])
    with TimedExtract(backbone) as all_layers:
        probe_task(backbone, task, every, options)
    with TimedExtract(backbone) as one_layer:
        probe_task(backbone, task, [backbone.num_blocks - 1], options)
    with TimedExtract(backbone) as bare:
        bare_forward(backbone, task, [backbone.num_blocks - 1], bs, all_splits)
    full = bare.seconds
    print(f"3. probing all {len(every)} layers: backbone time {all_layers.seconds:.2f}s in {all_layers.calls} "
          f"forward calls vs one full forward pass over the data {full:.2f}s: {all_layers.seconds / full:.3f}x "
          f"(target <= 1.2x); one layer needs {one_layer.calls} calls, all layers {all_layers.calls}")


if __name__ == "__main__":
    main()
