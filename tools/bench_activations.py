"""Benchmark where activations come from: building a store, reading it, and probing all layers at once.

Measures, on one backbone (default a random-weight ViT-S/16 at 224 px; weights do not change the timing)
and procedurally generated images (``synth-shapes`` rows, upsampled by the backbone's preprocessing):

1. cache build vs a bare forward pass over the same images and layers (target: <= 1.10x);
2. one InCA training epoch reading the store vs one reading the live backbone (target: >= 20x faster);
3. the read rate of a store epoch with one cheap adapter (1 head) per layer: the train split's bytes over
   the epoch's time, next to a plain sequential read of the same files and to the store's loader alone,
   page cache cold (pages dropped with ``posix_fadvise``) and warm (target: epoch >= 70% of the plain read);
4. the backbone time of probing every layer (linear + kNN + InCA probes) vs one bare forward pass over the
   task's data (target: <= 1.2x), with the number of backbone forward calls for all layers and for one.

    OMP_NUM_THREADS=2 python tools/bench_activations.py --rows 256
    python tools/bench_activations.py --backbone vit_large_patch16_224 --device cuda --rows 2048
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from inca.activations import ActivationSource, CachedSource, LiveSource
from inca.adapters.inca import AdapterSpec, InCABank
from inca.backbone import Backbone, create_backbone, resolve_layers
from inca.cache import ActivationCache, build_cache
from inca.devices import resolve_device
from inca.probe import probe_task
from inca.probes import ProbeSuiteConfig
from inca.tasks import SPLITS, Split, Task, image_loader, load_task, sequential_batches
from inca.train.bank import epoch_batches, train_bank


def subset_task(spec: str, rows: int) -> Task:
    """The first ``rows`` images of a task's train split, and a fifth as many for val and test."""
    task = load_task(spec)
    sizes = {"train": rows, "val": max(1, rows // 5), "test": max(1, rows // 5)}
    splits = {name: task.splits[name].subset(np.arange(min(n, len(task.splits[name])))) for name, n in sizes.items()}
    return Task(f"{spec}[:{rows}]", task.classes, splits, {**task.identity, "rows": rows})


def bare_forward(backbone: Backbone, task: Task, layers: list[int], batch_size: int, splits=("train",)) -> float:
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


def one_epoch(backbone: Backbone, source: ActivationSource, layers: list[int], batch_size: int, classes: int,
              heads: int | None = None) -> float:  # fmt: skip
    """Seconds for one training epoch of one adapter per layer (``heads`` each, default the backbone's)."""
    specs = [AdapterSpec(layer=layer, num_heads=heads or backbone.num_heads) for layer in layers]
    bank = InCABank(specs, backbone.width, classes)
    start = time.perf_counter()
    train_bank(bank, source, epochs=1, batch_size=batch_size, device=backbone.device, progress=False)
    _sync(backbone.device)
    return time.perf_counter() - start


def build_vs_forward(
    backbone: Backbone, task: Task, layers: list[int], batch_size: int, cache_dir: str | os.PathLike
) -> tuple[ActivationCache, float, float]:
    """Build a store of every split; its seconds and those of a bare forward pass over the same images."""
    bare_forward(backbone, task, layers, batch_size, ("val",))  # warm-up
    forward = bare_forward(backbone, task, layers, batch_size, tuple(SPLITS))
    start = time.perf_counter()
    cache = build_cache(backbone, task, layers, cache_dir, batch_size=batch_size)
    return cache, time.perf_counter() - start, forward


def store_vs_live(backbone: Backbone, task: Task, cache: ActivationCache, layers: list[int],
                  batch_size: int) -> tuple[float, float]:  # fmt: skip
    """Seconds of one InCA epoch from the store (best of 3, page cache warm) and from the live backbone."""
    cached = CachedSource(cache, layers)
    one_epoch(backbone, cached, layers, batch_size, task.num_classes)  # warm the page cache
    from_store = min(one_epoch(backbone, cached, layers, batch_size, task.num_classes) for _ in range(3))
    live = one_epoch(backbone, LiveSource(backbone, task, layers), layers, batch_size, task.num_classes)
    return from_store, live


def _drop_page_cache(files: list[Path]) -> None:
    """Evict ``files`` from the page cache (``posix_fadvise``; pages still mapped by a process stay)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sequential_read(files: list[Path]) -> None:
    buffer = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def epoch_io(backbone: Backbone, store: Path, layers: list[int], batch_size: int, classes: int,
             repeats: int = 3) -> dict[str, dict[str, float]]:  # fmt: skip
    """GB/s over the train split's layer files: a plain sequential read of them, the store's loader alone, and
    a training epoch of one 1-head adapter per layer; best of ``repeats``. ``cold``: pages dropped and the
    store opened afresh before each run (where ``posix_fadvise`` exists); ``warm``: one store object already
    read through, as a training sees it from its second epoch on."""
    files = [store / "train" / f"layer_{layer}.npy" for layer in layers]
    size = sum(f.stat().st_size for f in files)
    n = ActivationCache(store).num_rows("train")

    def loader(cache: ActivationCache) -> None:
        for _ in CachedSource(cache, layers).loader("train", epoch_batches(n, batch_size, 0, 0)):
            pass

    def epoch(cache: ActivationCache) -> None:
        one_epoch(backbone, CachedSource(cache, layers), layers, batch_size, classes, heads=1)

    def fresh() -> ActivationCache:
        _drop_page_cache(files)
        return ActivationCache(store)

    def timed(run: Callable[[ActivationCache], None], cache: ActivationCache) -> float:
        gc.collect()
        start = time.perf_counter()
        run(cache)
        return size / (time.perf_counter() - start) / 1e9

    runs = {"plain read": lambda _: _sequential_read(files), "loader": loader, "epoch": epoch}
    rates: dict[str, dict[str, float]] = {}
    if hasattr(os, "posix_fadvise"):  # first: a warm store's mappings would keep its pages resident
        rates["cold"] = {name: max(timed(run, fresh()) for _ in range(repeats)) for name, run in runs.items()}
    warm = ActivationCache(store)
    loader(warm)
    rates["warm"] = {name: max(timed(run, warm) for _ in range(repeats)) for name, run in runs.items()}
    return rates


class TimedExtract:
    """Wraps ``backbone.extract`` to add up the time spent in it and count its calls."""

    def __init__(self, backbone: Backbone) -> None:
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
    parser.add_argument("--skip-probe", action="store_true", help="skip the probing benchmark (4)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    backbone = create_backbone(args.backbone, args.weights, device=resolve_device(args.device))
    layers = resolve_layers(args.layers, backbone.num_blocks)
    task = subset_task(args.task, args.rows)
    bs = args.batch_size
    print(f"{args.backbone} ({args.weights} weights) on {backbone.device}, {task.spec}, layers {layers}, "
          f"batch {bs}, {torch.get_num_threads()} threads; timings from random weights and synthetic images")

    with tempfile.TemporaryDirectory() as cache_dir:
        cache, build, forward = build_vs_forward(backbone, task, layers, bs, cache_dir)
        print(f"\n1. cache build {build:.2f}s vs bare forward {forward:.2f}s over {sum(task.sizes().values())} "
              f"images: {build / forward:.3f}x (target <= 1.10x)")
        from_store, live = store_vs_live(backbone, task, cache, layers, bs)
        print(f"2. InCA epoch ({len(layers)} adapters) from the store {from_store:.3f}s vs live backbone "
              f"{live:.2f}s: {live / from_store:.1f}x faster (target >= 20x)")
        store = cache.path
        del cache  # its memmaps would keep the store's pages resident
        rates = epoch_io(backbone, store, layers, bs, task.num_classes)
    print(f"3. store epoch read rate, one 1-head adapter per layer ({len(layers)} layers, train split), GB/s:")
    print(f"   {'page cache':<11} {'plain read':>10} {'loader':>8} {'epoch':>7} {'epoch / plain read':>19}")
    for state, rate in rates.items():
        print(f"   {state:<11} {rate['plain read']:>10.2f} {rate['loader']:>8.2f} {rate['epoch']:>7.2f} "
              f"{rate['epoch'] / rate['plain read']:>18.0%}  (target >= 70%)")
    if args.skip_probe:
        return

    every = list(range(backbone.num_blocks))
    options = ProbeSuiteConfig(probes=["linear", "knn", "inca"], inca_epochs=3, batch_size=bs, linear_c=[1.0])
    with TimedExtract(backbone) as all_layers:
        probe_task(backbone, task, every, options)
    with TimedExtract(backbone) as one_layer:
        probe_task(backbone, task, [backbone.num_blocks - 1], options)
    with TimedExtract(backbone) as bare:
        bare_forward(backbone, task, [backbone.num_blocks - 1], bs, tuple(SPLITS))
    full = bare.seconds
    print(f"4. probing all {len(every)} layers: backbone time {all_layers.seconds:.2f}s in {all_layers.calls} "
          f"forward calls vs one full forward pass over the data {full:.2f}s: {all_layers.seconds / full:.3f}x "
          f"(target <= 1.2x); one layer needs {one_layer.calls} calls, all layers {all_layers.calls}")


if __name__ == "__main__":
    main()
