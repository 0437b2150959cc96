"""Benchmark: peak memory of every comparison method on the same backbone and batch, side by side.

Every method runs through the comparison harness itself (:func:`inca.compare.run_comparison`) on a task of
random images with ``--steps`` training batches of ``--batch`` images (one epoch, then val and test of one
batch each), so the figures are exactly what ``inca-compare`` reports (:class:`inca.memory.PeakMemory`):
on CUDA the max allocated memory during the method over what was allocated at its start; on CPU the growth
of the process's peak RSS. Methods that train their own copy of the backbone count that copy; InCA, which
reads the shared live backbone, is charged the backbone's weights, so every method counts the weights once.

It also measures the target "peak memory, 20 InCA adapters on live backbone vs full fine-tuning
<= 25%": the ``inca`` method runs one bank of ``--adapters`` adapters (layers x learning rates) on
activations streamed from the live backbone (no cache).

    python tools/bench_memory.py --model vit_small_patch16_224 --batch 16
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from inca.backbone import create_backbone
from inca.compare import run_comparison
from inca.devices import resolve_device
from inca.methods import METHODS, RunConfig, resolve_methods
from inca.tasks.base import ArraySource, Split, Task


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name")
    parser.add_argument("--weights", default="random", help="random | pretrained | PATH (memory is the same)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V", help="e.g. img_size=32 depth=4")
    parser.add_argument("--batch", type=int, default=16, help="images per training step, every method")
    parser.add_argument("--steps", type=int, default=2, help="training steps per method")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--adapters", type=int, default=20, help="InCA adapters in the bank")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--method-args", nargs="*", default=[], metavar="METHOD.KEY=VALUE",
                        help="as inca-compare's, e.g. compacter.reduction=16 for a 192-wide model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser.parse_args()


def random_task(rows: dict[str, int], size: int, num_classes: int) -> Task:
    """Random RGB images at the model's input size, balanced labels: the data does not change memory."""
    rng = np.random.default_rng(0)
    total = sum(rows.values())
    source = ArraySource(rng.integers(0, 256, (total, size, size, 3), dtype=np.uint8), "random")
    labels = np.arange(total) % num_classes
    bounds = np.cumsum([0, *rows.values()])
    splits = {name: Split(source, np.arange(a, b), labels[a:b]) for name, a, b in zip(rows, bounds, bounds[1:])}
    return Task("random-images", [f"class{i}" for i in range(num_classes)], splits)


def inca_grid(num_blocks: int, adapters: int) -> list[str]:
    """``adapters`` adapters as evenly spread layers x learning rates, read live (no activation cache)."""
    n_layers = max(d for d in range(1, min(num_blocks, adapters) + 1) if adapters % d == 0)
    layers = np.linspace(0, num_blocks - 1, n_layers).round().astype(int).tolist()
    lrs = [1e-3 * 0.5**i for i in range(adapters // n_layers)]
    return [f"inca.layers={','.join(map(str, layers))}", f"inca.lr=[{','.join(map(str, lrs))}]", "inca.cache=never"]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backbone = create_backbone(args.model, args.weights, args.model_kwargs, device=device)
    methods = resolve_methods(args.methods, inca_grid(backbone.num_blocks, args.adapters) + args.method_args)
    size = backbone.data_config["input_size"][-1]
    task = random_task({"train": args.batch * args.steps, "val": args.batch, "test": args.batch}, size,
                       args.num_classes)
    settings = RunConfig(epochs=1, batch_size=args.batch, seed=0, progress=False)
    with tempfile.TemporaryDirectory() as out:
        summary = run_comparison(backbone, [task.spec], methods, settings, out, load=lambda _: task)
    records = {r["method"]: r for r in summary["results"]}

    where = f"{device.type.upper()}" + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    kwargs = f" {backbone.model_kwargs}" if backbone.model_kwargs else ""
    print(f"measured on a {args.weights}-weight {args.model}{kwargs} on {where}, "
          f"{summary['backbone_params']:,} backbone parameters, batch {args.batch} at {size}px, "
          f"{args.steps} training steps per method")
    print(f"peak memory = {summary['memory']} (+ the backbone's weights for inca)")
    if device.type != "cuda":
        print("note: CPU peak RSS of a small model on CPU is a proxy; the target is about GPU memory of large "
              "models (run on CUDA for the real figure)")
    print(f"{'method':<12} {'trainable params':>16} {'peak memory (MB)':>17} {'seconds':>8}")
    for name, r in records.items():
        label = f"{name} ({args.adapters})" if name == "inca" else name
        print(f"{label:<12} {r['trainable_params']:>16,} {r['peak_memory_mb']:>17.1f} {r['seconds']:>8.1f}")
    if "inca" in records and "full" in records:
        ratio = records["inca"]["peak_memory_mb"] / records["full"]["peak_memory_mb"]
        verdict = "meets" if ratio <= 0.25 else "misses"
        print(f"{args.adapters} InCA adapters on the live backbone / full fine-tuning: {100 * ratio:.1f}% "
              f"(target <= 25%: {verdict})")


if __name__ == "__main__":
    main()
