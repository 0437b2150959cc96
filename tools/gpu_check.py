"""One performance check of inca's GPU paths, printed as one table (random weights: nothing is downloaded).

Rows, on a ViT-L/16 at 224 px unless ``--quick``:

* folded InCA vs the ``nn.MultiheadAttention`` adapter, forward + backward, ViT-L width, fp32 and bf16;
* a bank of 16 and of 64 adapters vs the same adapters trained one by one (target >= 8x for 16);
* an InCA epoch from the activation store vs from the live backbone (target >= 20x), and the store's build
  vs a bare forward pass (target <= 1.10x);
* an InCA epoch from an int8 store vs a float16 one (target: no slower) and vs the live backbone, with the int8
  store's bytes and token cosine to float16, and the store held in GPU memory (``--cache-device cuda``) vs read
  from its memmaps;
* peak CUDA memory (``torch.cuda.max_memory_allocated``) of 20 InCA adapters trained on live activations vs
  full fine-tuning at the same batch (target <= 25%; the InCA paper reports 76% less);
* images/s of :class:`inca.MultiTaskInCA` serving three tasks, next to the bare forward pass;
* one training step of every ``inca-compare`` method (bf16 autocast on CUDA), each without error.

Every check runs under a time budget; one that fails or overruns prints FAIL in its rows and the others
still run. The exit status is 1 when a row failed. ``--quick`` shrinks everything (a ViT-Ti on 64 px
images, small batches) so that ``--quick --device cpu`` takes a couple of minutes: tests/test_gpu_check.py
runs it, so the script cannot rot.

    bash tools/gpu_check.sh                         # one H200: under 8 minutes
    bash tools/gpu_check.sh --quick --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from bench_activations import (
    build_vs_forward,
    held_vs_memmap,
    int8_vs_float16,
    one_epoch,
    store_vs_live,
    subset_task,
)
from bench_inca import BankSetting, adapter_vs_mha, bank_vs_separate, interleaved
from bench_memory import inca_grid, random_task

from inca.activations import LiveSource
from inca.adapters.inca import InCA
from inca.adapters.saved import TaskAdapter
from inca.backbone import Backbone, create_backbone, intermediate_tokens, resolve_layers
from inca.cache import build_cache
from inca.compare import run_comparison
from inca.devices import autocast, resolve_device
from inca.inference import MultiTaskInCA
from inca.methods import METHODS, RunConfig, resolve_methods, run_method

Row = tuple[str, str, str, str]  # check, measured, target, verdict


@dataclass(frozen=True)
class Setup:
    """Sizes of every check, and each check's time budget in seconds."""

    model: str
    model_kwargs: dict[str, Any]
    width: tuple[int, int]  # (dim, heads) of the folded-vs-MHA check
    tokens: int
    bank: BankSetting
    store_rows: int
    batch: int
    repeats: int
    budgets: dict[str, float] = field(default_factory=dict)


FULL = Setup(
    "vit_large_patch16_224", {}, (1024, 16), 197, BankSetting(1024, 16, 4, 197, 512, 32, 1), 1024, 32, 10,
    {"adapter": 30, "bank": 100, "store": 120, "store8": 150, "memory": 70, "inference": 20, "methods": 110},
)  # fmt: skip
QUICK = Setup(
    "vit_tiny_patch16_224", {"img_size": 64, "depth": 6}, (192, 3), 50, BankSetting(192, 3, 4, 50, 16, 16, 1), 32,
    8, 2, {"adapter": 30, "bank": 90, "store": 60, "store8": 60, "memory": 60, "inference": 20, "methods": 90},
)  # fmt: skip


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the check when it runs past ``seconds`` (SIGALRM: Unix, main thread)."""

    def overrun(*_: object) -> None:
        raise TimeoutError(f"over its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, overrun)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def verdict(value: float, target: float, at_least: bool) -> str:
    return "ok" if (value >= target if at_least else value <= target) else "MISS"


def check_adapter(setup: Setup, device: torch.device, backbone: Backbone) -> list[Row]:
    dim, heads = setup.width
    rows = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        mha, folded, err = adapter_vs_mha(device, setup.repeats, dim, heads, 32, setup.tokens, 100, dtype)
        measured = f"{mha / folded:.1f}x ({mha:.2f} vs {folded:.2f} ms, width {dim}), outputs equal to {err:.0e}"
        rows.append((f"folded vs MHA adapter, {name}", measured, ">= 20x", verdict(mha / folded, 20, True)))
    return rows


def check_bank(setup: Setup, device: torch.device, backbone: Backbone) -> list[Row]:
    rows = []
    for count, ms in bank_vs_separate(setup.bank, [16, 64], device, max(1, setup.repeats // 4)).items():
        ratio = ms["separate"] / ms["bank"]
        target, ok = (">= 8x", verdict(ratio, 8, True)) if count == 16 else ("-", "-")
        measured = f"{ratio:.1f}x ({ms['separate']:.0f} vs {ms['bank']:.0f} ms an epoch, width {setup.bank.dim})"
        rows.append((f"bank of {count} vs separate trainings", measured, target, ok))
    return rows


def check_store(setup: Setup, device: torch.device, backbone: Backbone) -> list[Row]:
    layers = resolve_layers("last:4", backbone.num_blocks)
    task = subset_task("synth-shapes", setup.store_rows)
    with tempfile.TemporaryDirectory() as cache_dir:
        cache, build, forward = build_vs_forward(backbone, task, layers, setup.batch, cache_dir)
        from_store, live = store_vs_live(backbone, task, cache, layers, setup.batch)
    speed_up, ratio = live / from_store, build / forward
    return [
        ("InCA epoch, store vs live", f"{speed_up:.1f}x ({live:.2f} vs {from_store:.3f} s, {len(layers)} layers)",
         ">= 20x", verdict(speed_up, 20, True)),
        ("store build vs bare forward", f"{ratio:.3f}x ({build:.2f} vs {forward:.2f} s)", "<= 1.10x",
         verdict(ratio, 1.10, False)),
    ]  # fmt: skip


def check_store8(setup: Setup, device: torch.device, backbone: Backbone) -> list[Row]:
    layers = resolve_layers("last:4", backbone.num_blocks)
    task = subset_task("synth-shapes", setup.store_rows)
    with tempfile.TemporaryDirectory() as cache_dir:
        r = int8_vs_float16(backbone, task, layers, setup.batch, cache_dir)
        live = one_epoch(backbone, LiveSource(backbone, task, layers), layers, setup.batch, task.num_classes)
        held_on = str(device) if device.type == "cuda" else "cpu"
        store = build_cache(backbone, task, layers, f"{cache_dir}/float16", setup.batch)  # int8_vs_float16's
        disk, held = held_vs_memmap(backbone, store, layers, setup.batch, task.num_classes, held_on)
    ratio = r["epoch int8"] / r["epoch float16"]
    measured = (f"{ratio:.2f}x ({r['epoch int8']:.3f}/{r['epoch float16']:.3f} s, live {live:.2f}), bytes "
                f"{r['bytes int8'] / r['bytes float16']:.2f}x, cos {r['cosine min']:.4f}")
    return [
        ("InCA epoch, int8 vs float16 store (vs live)", measured, "<= 1.0x", verdict(ratio, 1.0, False)),
        ("store held in device memory vs memmap", f"{disk / held:.2f}x ({held:.3f} vs {disk:.3f} s, {held_on})", "-",
         "-"),
    ]  # fmt: skip


def check_memory(setup: Setup, device: torch.device, backbone: Backbone) -> list[Row]:
    methods = resolve_methods("inca,full", inca_grid(backbone.num_blocks, 20))
    size = backbone.data_config["input_size"][-1]
    task = random_task({"train": 2 * setup.batch, "val": setup.batch, "test": setup.batch}, size, 10)
    settings = RunConfig(epochs=1, batch_size=setup.batch, seed=0, progress=False, head_init="random")
    with tempfile.TemporaryDirectory() as out:
        summary = run_comparison(backbone, [task.spec], methods, settings, out, load=lambda _: task)
    mb = {r["method"]: r["peak_memory_mb"] for r in summary["results"]}
    ratio = mb["inca"] / mb["full"]
    kind = "CUDA max allocated" if device.type == "cuda" else "CPU peak RSS"
    measured = f"{ratio:.0%} ({mb['inca']:.0f} vs {mb['full']:.0f} MB, {kind}, batch {setup.batch})"
    return [("peak memory, 20 InCA adapters (live) vs full FT", measured, "<= 25%", verdict(ratio, 0.25, False))]


def check_inference(setup: Setup, device: torch.device, backbone: Backbone) -> list[Row]:
    dim, heads, depth = backbone.width, backbone.num_heads, backbone.num_blocks
    layers = [depth // 2, depth - 2, depth - 1]
    adapters = {f"task{k}": TaskAdapter([InCA(dim, 10, heads, seed=k)], [layer], [str(c) for c in range(10)])
                for k, layer in enumerate(layers)}  # fmt: skip
    model = MultiTaskInCA(backbone, adapters).to(device).eval()
    size = backbone.data_config["input_size"][-1]
    images = torch.randn(2 * setup.batch, 3, size, size, device=device)

    def serve() -> None:
        with torch.inference_mode(), autocast(device):
            model(images)

    def bare() -> None:
        with torch.inference_mode(), autocast(device):
            intermediate_tokens(backbone.model, images, [depth - 1])

    ms = interleaved({"serve": serve, "bare": bare}, setup.repeats, device)
    rate, bare_rate = [len(images) / ms[k] * 1e3 for k in ("serve", "bare")]
    measured = f"{rate:.0f} images/s for 3 tasks (bare forward {bare_rate:.0f}, batch {len(images)})"
    return [("MultiTaskInCA inference", measured, "-", "-")]


def check_methods(setup: Setup, device: torch.device, backbone: Backbone) -> list[Row]:
    size = backbone.data_config["input_size"][-1]
    batch = max(2, setup.batch // 4)
    task = random_task({"train": batch, "val": batch, "test": batch}, size, 10)  # one training step
    settings = RunConfig(epochs=1, batch_size=batch, seed=0, progress=False, head_init="random")
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    rows = []
    for name in METHODS:
        hparams = {"layers": "-1", "cache": "never"} if name == "inca" else {}
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as work_dir:
                result = run_method(name, backbone, task, hparams, settings, work_dir)
            loss = result.loss_curve[-1]
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss}")
            measured, ok = f"{result.steps} step, loss {loss:.3f}, {time.perf_counter() - start:.1f} s", "ok"
        except TimeoutError:
            raise
        except Exception as exc:  # one method's failure is that row's FAIL
            measured, ok = _failure(exc), "FAIL"
        rows.append((f"one training step: {name}", f"{measured} ({precision})", "no error", ok))
    return rows


CHECKS: dict[str, tuple[Callable[[Setup, torch.device, Backbone], list[Row]], list[str]]] = {
    "adapter": (check_adapter, ["folded vs MHA adapter, fp32", "folded vs MHA adapter, bf16"]),
    "bank": (check_bank, ["bank of 16 vs separate trainings", "bank of 64 vs separate trainings"]),
    "store": (check_store, ["InCA epoch, store vs live", "store build vs bare forward"]),
    "store8": (check_store8, ["InCA epoch, int8 vs float16 store (vs live)", "store held in device memory vs memmap"]),
    "memory": (check_memory, ["peak memory, 20 InCA adapters (live) vs full FT"]),
    "inference": (check_inference, ["MultiTaskInCA inference"]),
    "methods": (check_methods, [f"one training step: {name}" for name in METHODS]),
}


def _failure(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 70 else text[:67] + "..."


def print_row(row: Row) -> None:
    check, measured, target, ok = row
    print(f"| {check:<48} | {measured:<62} | {target:<8} | {ok:<7} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--quick", action="store_true", help="small models and batches (minutes on a CPU)")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), default=list(CHECKS), help="checks to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    setup = QUICK if args.quick else FULL
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"inca GPU check on {name}, torch {torch.__version__}, {setup.model} {setup.model_kwargs or ''} "
          "(random weights)\n", flush=True)  # fmt: skip
    print_row(("check", "measured", "target", "verdict"))
    print(f"|{'-' * 50}|{'-' * 64}|{'-' * 10}|{'-' * 9}|", flush=True)
    start, failed = time.perf_counter(), 0
    backbone = create_backbone(setup.model, "random", setup.model_kwargs, device=device)
    for key in args.only:
        check, expected = CHECKS[key]
        try:
            with budget(setup.budgets[key]):
                rows = check(setup, device, backbone)
        except Exception as exc:  # a failed check is its rows' FAIL; the others still run
            rows = [(label, _failure(exc), "", "FAIL") for label in expected]
        for row in rows:
            print_row(row)
            failed += row[3] == "FAIL"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{failed} failed; {time.perf_counter() - start:.0f} s in all", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
