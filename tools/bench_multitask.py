"""Benchmark composable multi-task inference: N tasks' adapters served by ``MultiTaskInCA`` from one
backbone pass, against one adapter alone and against N separate ``InCAClassifier`` passes.

For N = 1, 4, 16 adapters (InCA, the backbone's heads, one query) spread over the backbone's layers, the
deepest always being the last block (so every N runs the backbone to the same depth), it reports:

- the time of one ``MultiTaskInCA`` batch relative to N = 1 (target: <= 1.1x for N = 16);
- the blocks run per batch (one pass: each block once, counted with forward hooks);
- the speed-up over running each adapter on its own backbone pass;
- the largest difference between the multi-task logits and each adapter run alone (must be ~0).

Random weights and random images: the figures time the code; they say nothing about accuracy. Timings
are the best of ``--repeats`` calls, contenders interleaved so machine noise hits all of them.

    OMP_NUM_THREADS=2 python tools/bench_multitask.py --model vit_small_patch16_224 --batch 64
"""

from __future__ import annotations

import argparse
import time

import torch

from inca import InCA, InCAClassifier, MultiTaskInCA, TaskAdapter, create_backbone


def layers_for(count: int, depth: int) -> list[int]:
    """``count`` layers spread over ``depth`` blocks, the last block always among them."""
    return [depth - 1 - (i * depth // count) % depth for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--counts", default="1,4,16")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = create_backbone(args.model, "random", device=args.device)
    depth, width, heads = backbone.num_blocks, backbone.width, backbone.num_heads
    size = backbone.data_config["input_size"]
    images = torch.randn(args.batch, *size, device=args.device)
    counts = [int(c) for c in args.counts.split(",")]
    models = {}
    for n in counts:
        adapters = {}
        for i, layer in enumerate(layers_for(n, depth)):
            inca = InCA(width, args.classes, heads, seed=i)
            torch.nn.init.normal_(inca.head.weight, std=0.02)  # a zero head would make every output equal
            adapters[f"task{i}"] = TaskAdapter([inca], [layer], [str(c) for c in range(args.classes)])
        models[n] = MultiTaskInCA(backbone, adapters).to(args.device).eval()

    calls = [0] * depth
    for i, block in enumerate(backbone.model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    def run(n: int) -> float:
        """Milliseconds of one multi-task batch."""
        start = time.perf_counter()
        with torch.inference_mode():
            models[n](images)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    for n in counts:  # warm-up, and one pass of block counting per N
        calls[:] = [0] * depth
        run(n)
        blocks_run = list(calls)
        assert blocks_run == [1] * depth, blocks_run
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.repeats):
        for n in counts:
            times[n].append(run(n))
    best = {n: min(t) for n, t in times.items()}

    largest = max(counts)
    model = models[largest]
    with torch.inference_mode():
        together = model(images)
        alone = {}
        start = time.perf_counter()
        for task, adapter in zip(model.tasks, model.adapters):
            alone[task] = InCAClassifier(backbone, adapter.layers[0], adapter.members[0])(images)
        separate_ms = (time.perf_counter() - start) * 1e3
    error = max((together[t] - alone[t]).abs().max().item() for t in model.tasks)

    print(f"MultiTaskInCA on {args.model} (random weights), batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats}")
    print(f"{'adapters':>8} {'ms/batch':>9} {'vs N=1':>7} {'blocks run':>10}")
    for n in counts:
        print(f"{n:>8} {best[n]:>9.1f} {best[n] / best[counts[0]]:>6.3f}x {depth:>10}")
    print(f"N={largest}: {largest} separate InCAClassifier passes take {separate_ms:.0f} ms, "
          f"{separate_ms / best[largest]:.1f}x the multi-task pass; max |logit difference| {error:.2e}")


if __name__ == "__main__":
    main()
