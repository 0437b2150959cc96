"""Benchmark: one LoRA training step with inca's LoRA vs PEFT's LoRA on the same timm ViT.

Both models start from the same random-weight backbone with the same LoRA A matrices, the same targets,
rank and alpha, and the head trainable; a step is forward + cross-entropy + backward + AdamW. Steps are
interleaved (inca, PEFT, inca, ...) so drifting CPU clocks hit both equally, and the median is reported.
The two trajectories are also compared, so a fast-but-wrong implementation would show up.

Target: inca / PEFT <= 1.0x. Needs the optional ``bench`` extra (peft).

    python tools/bench_lora.py --model vit_small_patch16_224 --batch 8 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from inca.adapters.common import DEFAULT_TARGET
from inca.adapters.lora import apply_lora, lora_layers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="module-name regex (re.fullmatch)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model  # optional dependency: the `bench` extra

    torch.manual_seed(args.seed)
    base = timm.create_model(
        args.model, pretrained=False, img_size=args.img_size, num_classes=args.num_classes
    )
    ours = copy.deepcopy(base)
    apply_lora(ours, rank=args.rank, alpha=args.alpha, target=args.target)
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=args.target)
    )
    inner = theirs.base_model.model
    with torch.no_grad():  # identical starting point: same A (B is zero in both)
        for name, layer in lora_layers(ours).items():
            inner.get_submodule(name).lora_A["default"].weight.copy_(layer.lora_A)
    for p in inner.get_classifier().parameters():
        p.requires_grad_(True)
    return ours.train(), theirs.train()


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start, loss.item()

    return step, sum(p.numel() for p in params)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs = build(args)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    step_ours, n_ours = make_step(ours, x, y)
    step_theirs, n_theirs = make_step(theirs, x, y)
    assert n_ours == n_theirs, (n_ours, n_theirs)

    times_ours, times_theirs, loss_gap = [], [], 0.0
    for i in range(args.warmup + args.steps):
        t_ours, l_ours = step_ours()
        t_theirs, l_theirs = step_theirs()
        loss_gap = max(loss_gap, abs(l_ours - l_theirs))
        if i >= args.warmup:
            times_ours.append(t_ours)
            times_theirs.append(t_theirs)

    ms_ours = 1e3 * statistics.median(times_ours)
    ms_theirs = 1e3 * statistics.median(times_theirs)
    print(f"measured on a random-weight {args.model} on CPU ({torch.get_num_threads()} threads), "
          f"batch {args.batch}, {args.img_size}px, rank {args.rank}, {n_ours} trainable parameters, "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up")
    print(f"inca LoRA : {ms_ours:8.1f} ms/step")
    print(f"PEFT LoRA : {ms_theirs:8.1f} ms/step")
    print(f"ratio inca/PEFT: {ms_ours / ms_theirs:.3f}x (target <= 1.0x)")
    print(f"max |loss difference| over the {args.warmup + args.steps} steps: {loss_gap:.2e}")


if __name__ == "__main__":
    main()
