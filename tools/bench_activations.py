"""Benchmark where activations come from: building a store, reading it, and probing all layers at once.

Measures, on one backbone (default a random-weight ViT-S/16 at 224 px; weights do not change the timing)
and procedurally generated images (``synth-shapes`` rows, upsampled by the backbone's preprocessing):

1. cache build vs a bare forward pass over the same images and layers (target: <= 1.10x);
2. one InCA training epoch reading the store vs one reading the live backbone (target: >= 20x faster);
3. the read rate of a store epoch with one cheap adapter (1 head) per layer: the train split's bytes over
   the epoch's time, next to a plain sequential read of the same files and to the store's loader alone,
   page cache cold (pages dropped with ``posix_fadvise``) and warm (target: epoch >= 70% of the plain read);
4. the backbone time of probing every layer (linear + kNN + InCA probes) vs one bare forward pass over the
   task's data (target: <= 1.2x), with the number of backbone forward calls for all layers and for one;
5. the int8 store against the float16 one: bytes (target: <= 0.55x), token cosine similarity to float16 (target:
   >= 0.999, min and mean) and an InCA epoch from each (target: int8 no slower);
6. ``--cache auto``'s decision: the rates it measures, its predicted build and epoch times of both choices against
   the measured ones (their error), and whether it picks the faster;
7. a store held in memory (``--cache-device cpu``) against the memmap, one InCA epoch each;
8. ``--schemes``: the 8-bit schemes inca chose from, on this backbone's tokens as they are and with massive
   activations added (a few channels 20x larger in every token; in 2% of the tokens two channels at 300x the
   median, the share and size Darcet et al. 2024 and Sun et al. 2024 report): bytes, token cosine, and the cosine
   of each token's channels but its 4 largest (what a crushed token loses);
9. ``--accuracy "ARGS"``: ``inca-train ARGS`` with a float16, a bfloat16 and an int8 store (same seeds), test
   accuracy per task and the mean difference to float16 (target for int8: within 0.5 points; bfloat16, whose
   rounding is coarser than int8's on most values, shows how far mere rounding moves a training).

    OMP_NUM_THREADS=2 python tools/bench_activations.py --rows 256
    OMP_NUM_THREADS=1 python tools/bench_activations.py --rows 256 --only int8 decision held schemes
    OMP_NUM_THREADS=1 python tools/bench_activations.py --only --accuracy "--recipe recipes/demo.yaml" \
        --json runs/bench-dtype-demo.json  # docs/results.md's
    python tools/bench_activations.py --backbone vit_large_patch16_224 --device cuda --rows 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inca.activations import ActivationSource, CachedSource, LiveSource
from inca.adapters.inca import AdapterSpec, InCABank
from inca.backbone import Backbone, create_backbone, resolve_layers
from inca.cache import ActivationCache, build_cache, store_bytes
from inca.devices import resolve_device
from inca.io import atomic_write_json
from inca.placement import Workload, decide, measure_rates
from inca.quantize import Int8Layout, quantize
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
              heads: int | None = None, validate: bool = False) -> float:  # fmt: skip
    """Seconds for one training epoch of one adapter per layer (``heads`` each, default the backbone's), with
    ``validate`` followed by the val split's evaluation, as every epoch of inca-train is."""
    specs = [AdapterSpec(layer=layer, num_heads=heads or backbone.num_heads) for layer in layers]
    bank = InCABank(specs, backbone.width, classes)
    start = time.perf_counter()
    train_bank(bank, source, epochs=1, batch_size=batch_size, device=backbone.device, progress=False,
               eval_split="val" if validate else None)
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


def int8_vs_float16(backbone: Backbone, task: Task, layers: list[int], batch_size: int,
                    cache_dir: str | os.PathLike, repeats: int = 7) -> dict[str, float]:  # fmt: skip
    """Build a float16 and an int8 store of the same layers: their bytes, the int8 tokens' cosine similarity to
    the float16 ones (test split, every token of every layer), and one InCA epoch from each (best and median of
    ``repeats``, warm, the two interleaved)."""
    stores, seconds = {}, {}
    for dtype in ("float16", "int8"):
        start = time.perf_counter()
        stores[dtype] = build_cache(backbone, task, layers, Path(cache_dir) / dtype, batch_size=batch_size,
                                    dtype=dtype)
        seconds[f"build {dtype}"] = time.perf_counter() - start
    rows = np.arange(stores["float16"].num_rows("test"))
    cosines = torch.cat([F.cosine_similarity(stores["int8"].gather("test", k, rows).dequantize(),
                                             stores["float16"].gather("test", k, rows).float(), dim=-1).flatten()
                         for k in layers])
    sources = {dtype: CachedSource(store, layers, device="disk") for dtype, store in stores.items()}
    times: dict[str, list[float]] = {dtype: [] for dtype in sources}
    for repeat in range(1 + repeats):  # interleaved, so that drifts of a shared machine hit both alike
        for dtype, source in sources.items():
            took = one_epoch(backbone, source, layers, batch_size, task.num_classes)
            times[dtype] += [took] if repeat else []  # the first: warms the page cache
    epochs = {dtype: min(t) for dtype, t in times.items()}
    medians = {f"{dtype} median": float(np.median(t)) for dtype, t in times.items()}
    return {**seconds, "bytes float16": stores["float16"].nbytes(), "bytes int8": stores["int8"].nbytes(),
            "cosine min": cosines.min().item(), "cosine mean": cosines.mean().item(),
            "epoch float16": epochs["float16"], "epoch int8": epochs["int8"],
            "epoch float16 median": medians["float16 median"], "epoch int8 median": medians["int8 median"]}


def decision_vs_measured(backbone: Backbone, task: Task, layers: list[int], batch_size: int, epochs: int,
                         cache_dir: str | os.PathLike) -> tuple[object, dict[str, float]]:  # fmt: skip
    """``--cache auto``'s decision for ``epochs`` epochs (rates measured as open_source measures them), and the
    measured build and epoch times (training plus validation) of both choices."""
    specs = [AdapterSpec(layer=layer, num_heads=backbone.num_heads) for layer in layers]
    size = store_bytes(backbone, task, layers)
    rates = measure_rates(backbone, task, layers, specs, batch_size, cache_dir, size, "float16", "disk")
    decision = decide(rates, Workload(task.sizes(), epochs, size // sum(task.sizes().values())))
    start = time.perf_counter()
    store = build_cache(backbone, task, layers, Path(cache_dir) / "decision", batch_size=batch_size)
    build = time.perf_counter() - start
    cached = CachedSource(store, layers, device="disk")
    store_epoch = min(one_epoch(backbone, cached, layers, batch_size, task.num_classes, validate=True)
                      for _ in range(2))
    live = LiveSource(backbone, task, layers)
    stream_epoch = one_epoch(backbone, live, layers, batch_size, task.num_classes, validate=True)
    return decision, {"build": build, "store epoch": store_epoch, "stream epoch": stream_epoch}


def held_vs_memmap(backbone: Backbone, cache: ActivationCache, layers: list[int], batch_size: int, classes: int,
                   device: str = "cpu", repeats: int = 5) -> tuple[float, float]:  # fmt: skip
    """Seconds of one InCA epoch from the memmaps and from the store held on ``device`` (best of ``repeats``,
    warm, the two interleaved)."""
    sources = [CachedSource(cache, layers, device=place) for place in ("disk", device)]
    times: list[list[float]] = [[], []]
    for repeat in range(1 + repeats):  # the first: pages cached, or the layers loaded
        for source, kept in zip(sources, times):
            took = one_epoch(backbone, source, layers, batch_size, classes)
            kept += [took] if repeat else []
    return min(times[0]), min(times[1])


def with_massive_activations(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x`` with the outliers of trained ViTs added: four channels 20x larger in every token, and in 2% of the
    tokens two channels at 300x the median magnitude (Darcet et al. 2024; Sun et al. 2024)."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    b, t, d = x.shape
    x[..., torch.randperm(d, generator=g)[:4]] *= 20
    median = x.abs().median()
    chosen = torch.rand(b, t, generator=g).argsort(-1)[:, : max(1, round(0.02 * t))]
    for channel, sign in ((7 % d, 1.0), (d // 3, -1.0)):
        x[torch.arange(b)[:, None], chosen, channel] = sign * 300 * median
    return x


def _round(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 rounding with float16 scales ``absmax / 127``, dequantised."""
    step = (absmax / 127).half().float().clamp_min(torch.finfo(torch.float32).tiny)
    return (x / step).round().clamp(-127, 127) * step


def _groups(x: torch.Tensor, size: int = 64) -> torch.Tensor:
    g = x.unflatten(-1, (-1, size))
    return _round(g, g.abs().amax(-1, keepdim=True)).flatten(-2)


def _smoothed_groups(x: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    smooth = fit.abs().amax((0, 1)).sqrt().clamp_min(1e-6)  # SmoothQuant's migration (alpha 0.5), on train
    return _groups(x / smooth) * smooth


# The 8-bit schemes compared (each: dequantised tokens, and store bytes per token beyond one a value).
SCHEMES: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[int], int]]] = {
    "one scale per token": (lambda x, fit: _round(x, x.abs().amax(-1, keepdim=True)), lambda d: 2),
    "one scale per channel (train)": (lambda x, fit: _round(x, fit.abs().amax((0, 1))), lambda d: 0),
    "per-token groups of 64": (lambda x, fit: _groups(x), lambda d: 2 * d // 64),
    "SmoothQuant + groups of 64 (train)": (_smoothed_groups, lambda d: 2 * d // 64),
    "inca: groups + outliers in float16": (lambda x, fit: quantize(x).dequantize(),
                                           lambda d: Int8Layout(d).width - d),
}


def compare_schemes(train: torch.Tensor, test: torch.Tensor) -> dict[str, dict[str, float]]:
    """Bytes (x float16's), cosine min and mean, and the cosine of all but each token's 4 largest channels (min)
    of every scheme on ``test`` tokens ``[N, T, D]`` (schemes fitted on ``train``'s)."""
    d = test.shape[-1]
    keep = torch.ones_like(test, dtype=torch.bool).scatter_(-1, test.abs().topk(4, -1).indices, False)
    table = {}
    for name, (scheme, extra) in SCHEMES.items():
        approx = scheme(test, train)
        cosine = F.cosine_similarity(approx, test, dim=-1)
        rest = F.cosine_similarity(torch.where(keep, approx, 0), torch.where(keep, test, 0), dim=-1)
        table[name] = {"bytes": (d + extra(d)) / (2 * d), "min": cosine.min().item(), "mean": cosine.mean().item(),
                       "rest": rest.min().item()}
    return table


def layer_tokens(backbone: Backbone, task: Task, layers: list[int], batch_size: int,
                 split: str) -> dict[int, torch.Tensor]:  # fmt: skip
    """Every token of ``split`` for ``layers`` in float32 (rounded through float16, as a float16 store holds them)."""
    out: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    data = task.splits[split]
    for images, _ in image_loader(data, backbone.transform, sequential_batches(0, len(data), batch_size)):
        for k, v in backbone.extract(images, layers).items():
            out[k].append(v.half().float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def accuracy_by_dtype(arguments: str, out: Path) -> dict[str, dict[str, float]]:
    """``inca-train ARGUMENTS`` with a store of each dtype: each task's test accuracy."""
    results = {}
    for dtype in ("float16", "bfloat16", "int8"):
        command = [sys.executable, "-m", "inca", "train", *shlex.split(arguments), "--cache-dtype", dtype,
                   "--cache", "always", "--out", str(out / dtype), "--cache-dir", str(out / f"store-{dtype}")]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        tasks = json.loads((out / dtype / "results.json").read_text())["tasks"]
        results[dtype] = {spec: result["test_acc"] for spec, result in tasks.items()}
    return {spec: {dtype: results[dtype][spec] for dtype in results} for spec in results["float16"]}


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


SECTIONS = ("build", "epoch", "io", "probe", "int8", "decision", "held", "schemes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="timm model arguments, e.g. img_size=32 patch_size=8 depth=4 (integers)")
    parser.add_argument("--task", default="synth-shapes")
    parser.add_argument("--rows", type=int, default=256, help="train images (val and test: a fifth each)")
    parser.add_argument("--layers", default="last:4", help="layers cached and trained on (e.g. last:4)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10, help="epochs the decision (6) weighs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default: 1-7)")
    parser.add_argument("--skip-probe", action="store_true", help="skip the probing benchmark (4)")
    parser.add_argument("--schemes", action="store_true", help="also compare the 8-bit schemes (8)")
    parser.add_argument("--accuracy", metavar="ARGS", help='also run inca-train ARGS with both dtypes (9), e.g. '
                                                           '"--recipe recipes/demo.yaml"')
    parser.add_argument("--json", metavar="PATH", help="also write --accuracy's figures here (tools/proxy_results.py "
                                                       "reads them)")
    args = parser.parse_args()
    if args.json and not args.accuracy:
        parser.error("--json writes --accuracy's figures: give --accuracy too")
    logging.basicConfig(level=logging.WARNING)
    sections = set(SECTIONS[:7] if args.only is None else args.only) - ({"probe"} if args.skip_probe else set())
    sections |= {"schemes"} if args.schemes else set()

    if sections:
        kwargs = {k: int(v) for k, v in (item.split("=", 1) for item in args.model_kwargs)}
        backbone = create_backbone(args.backbone, args.weights, kwargs, device=resolve_device(args.device))
        layers = resolve_layers(args.layers, backbone.num_blocks)
        task = subset_task(args.task, args.rows)
        print(f"{args.backbone} {kwargs or ''} ({args.weights} weights) on {backbone.device}, {task.spec}, layers "
              f"{layers}, batch {args.batch_size}, {torch.get_num_threads()} threads")
        run_sections(sections, args, backbone, task, layers)
    if args.accuracy:
        with tempfile.TemporaryDirectory() as out:
            table = accuracy_by_dtype(args.accuracy, Path(out))
        print(f"9. test accuracy, inca-train {args.accuracy}, by store dtype (same seeds); points against float16:")
        print(f"   {'task':<20} {'float16':>8} {'bfloat16':>8} {'points':>7} {'int8':>8} {'points':>7}")
        points = {dtype: [100 * (acc[dtype] - acc["float16"]) for acc in table.values()]
                  for dtype in ("bfloat16", "int8")}
        for i, (spec, acc) in enumerate(table.items()):
            print(f"   {spec:<20} {acc['float16']:>8.4f} {acc['bfloat16']:>8.4f} {points['bfloat16'][i]:>+7.2f} "
                  f"{acc['int8']:>8.4f} {points['int8'][i]:>+7.2f}")
        print(f"   {'mean':<20} {np.mean([a['float16'] for a in table.values()]):>8.4f} "
              f"{np.mean([a['bfloat16'] for a in table.values()]):>8.4f} {np.mean(points['bfloat16']):>+7.2f} "
              f"{np.mean([a['int8'] for a in table.values()]):>8.4f} {np.mean(points['int8']):>+7.2f}  "
              "(target for int8: within 0.5 points)")
        if args.json:
            atomic_write_json(Path(args.json), {"arguments": args.accuracy, "threads": torch.get_num_threads(),
                                                "test_acc": table})
            print(f"wrote {args.json}")


def run_sections(sections: set[str], args: argparse.Namespace, backbone: Backbone, task: Task,
                 layers: list[int]) -> None:  # fmt: skip
    bs = args.batch_size
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = None
        if sections & {"build", "epoch", "io", "held"}:
            cache, build, forward = build_vs_forward(backbone, task, layers, bs, cache_dir)
            if "build" in sections:
                print(f"\n1. cache build {build:.2f}s vs bare forward {forward:.2f}s over "
                      f"{sum(task.sizes().values())} images: {build / forward:.3f}x (target <= 1.10x)")
        if "epoch" in sections:
            from_store, live = store_vs_live(backbone, task, cache, layers, bs)
            print(f"2. InCA epoch ({len(layers)} adapters) from the store {from_store:.3f}s vs live backbone "
                  f"{live:.2f}s: {live / from_store:.1f}x faster (target >= 20x)")
        if "held" in sections:
            disk, held = held_vs_memmap(backbone, cache, layers, bs, task.num_classes)
            print(f"7. InCA epoch from the store held in memory (--cache-device cpu) {held:.3f}s vs the memmap "
                  f"{disk:.3f}s: {disk / held:.2f}x")
        if "io" in sections:
            store = cache.path
            del cache  # its memmaps would keep the store's pages resident
            rates = epoch_io(backbone, store, layers, bs, task.num_classes)
            print(f"3. store epoch read rate, one 1-head adapter per layer ({len(layers)} layers, train split), GB/s:")
            print(f"   {'page cache':<11} {'plain read':>10} {'loader':>8} {'epoch':>7} {'epoch / plain read':>19}")
            for state, rate in rates.items():
                print(f"   {state:<11} {rate['plain read']:>10.2f} {rate['loader']:>8.2f} {rate['epoch']:>7.2f} "
                      f"{rate['epoch'] / rate['plain read']:>18.0%}  (target >= 70%)")
        if "int8" in sections:
            r = int8_vs_float16(backbone, task, layers, bs, Path(cache_dir) / "int8")
            print(f"5. int8 vs float16 store: {r['bytes int8'] / r['bytes float16']:.3f}x the bytes (target <= 0.55x; "
                  f"{r['bytes int8'] / 1e6:.1f} vs {r['bytes float16'] / 1e6:.1f} MB); token cosine to float16 min "
                  f"{r['cosine min']:.5f}, mean {r['cosine mean']:.6f} (target >= 0.999); InCA epoch "
                  f"{r['epoch int8']:.3f}s vs {r['epoch float16']:.3f}s: {r['epoch int8'] / r['epoch float16']:.2f}x, "
                  f"median {r['epoch int8 median'] / r['epoch float16 median']:.2f}x (target <= 1.0x); build "
                  f"{r['build int8']:.2f}s vs {r['build float16']:.2f}s")
        if "decision" in sections:
            decision, measured = decision_vs_measured(backbone, task, layers, bs, args.epochs, Path(cache_dir) / "d")
            e = args.epochs
            predicted = {"build": decision.build_seconds, "store epoch": decision.store_epoch_seconds,
                         "stream epoch": decision.stream_epoch_seconds}
            faster = "build" if measured["build"] + e * measured["store epoch"] <= e * measured["stream epoch"] \
                else "stream"
            print(f"6. --cache auto for {e} epochs: {decision.message()}")
            print(f"   {'':<13} {'predicted s':>11} {'measured s':>10} {'error':>7}")
            for key, value in predicted.items():
                print(f"   {key:<13} {value:>11.3f} {measured[key]:>10.3f} {value / measured[key] - 1:>+7.0%}")
            print(f"   choice {decision.choice}, measured faster {faster}: "
                  f"{'ok' if decision.choice == faster else 'MISS'} (build + {e} store epochs "
                  f"{measured['build'] + e * measured['store epoch']:.2f}s vs {e} live epochs "
                  f"{e * measured['stream epoch']:.2f}s)")
    if "schemes" in sections:
        train = layer_tokens(backbone, task, layers, bs, "train")
        test = layer_tokens(backbone, task, layers, bs, "test")
        print(f"8. 8-bit schemes on the test split's tokens of layers {layers} (worst layer; rest: all but each "
              "token's 4 largest channels):")
        print(f"   {'scheme':<36} {'bytes':>6} | {'as they are':^26} | {'with massive activations':^26}")
        print(f"   {'':<36} {'':>6} | {'cos min':>8} {'cos mean':>8} {'rest':>8} | {'cos min':>8} {'cos mean':>8} "
              f"{'rest':>8}")
        tables = [[compare_schemes(fit(train[k], seed=k), fit(test[k], seed=k)) for k in layers]
                  for fit in (lambda x, seed: x, with_massive_activations)]
        for name in SCHEMES:
            cells = []
            for per_layer in tables:
                rows = [t[name] for t in per_layer]
                cells.append(f"{min(r['min'] for r in rows):>8.5f} {min(r['mean'] for r in rows):>8.5f} "
                             f"{min(r['rest'] for r in rows):>8.5f}")
            print(f"   {name:<36} {rows[0]['bytes']:>6.3f} | {cells[0]} | {cells[1]}")
    if "probe" not in sections:
        return
    from inca.probe import probe_task
    from inca.probes import ProbeSuiteConfig

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
