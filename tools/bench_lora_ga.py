"""Benchmark: how many steps LoRA-GA takes to reach LoRA's final training loss (the paper: 2-4x faster).

Both methods train through the comparison's own loop (:func:`inca.methods.train_e2e`) on the same
task, backbone, batches, epochs and protocol (the head started by a linear probe unless ``--head-init`` says
otherwise), each as its authors train it (``inca-compare --help`` lists the defaults and their sources:
LoRA r 8, alpha 16, weight decay 0.1, warm-up 0.06; LoRA-GA the same rank and alpha with rsLoRA, ArB2r,
stable scale, gamma 16, 8 batches for the gradient, weight decay 0, warm-up 0.03) and its own learning rate,
tuned on a small grid by the lowest final training loss. ``--warmup-ratio`` forces one warm-up on both.
Convergence is measured as ``inca-compare`` measures it for every method (:mod:`inca.convergence`): the training
loss smoothed by a trailing mean over ``--window`` steps, a common target (the higher of the two final smoothed
losses), and each method's own first step at or below it; the ratio divides those two first crossings. LoRA-GA's
gradient-estimate batches are not counted as steps (they are reported).

A random-weight tiny ViT (the default) is a weak proxy for the paper's claim, which is about pretrained
models: LoRA-GA's advantage is that its first steps follow full fine-tuning of good features. Use the offline
proxy (``tools/pretrain_proxy.py``), a pretrained backbone or a weights file, and a real task:

    python tools/bench_lora_ga.py --task synth-shapes --epochs 3
    python tools/bench_lora_ga.py --weights runs/proxy/model.safetensors \
        --model-kwargs img_size=32 patch_size=8 depth=6 --task digits
"""

from __future__ import annotations

import argparse
import logging

import torch

from inca.backbone import create_backbone
from inca.config import as_list
from inca.convergence import crossings, smoothed_loss
from inca.devices import resolve_device
from inca.methods import HEAD_INITS, RunConfig, get_method, train_e2e
from inca.tasks import load_task


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--weights", default="random", help="random | pretrained | PATH")
    parser.add_argument("--model-kwargs", nargs="*", default=["img_size=32", "patch_size=8", "depth=4"],
                        metavar="K=V", help="timm kwargs (default: the tests' tiny ViT)")
    parser.add_argument("--task", default="synth-shapes")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-ratio", type=float, default=None,
                        help="one warm-up for both methods (default: each method's own)")
    parser.add_argument("--head-init", default="linear-probe", choices=HEAD_INITS, help="how the head starts")
    parser.add_argument("--lora-lrs", default="3e-4,1e-3,3e-3,1e-2", help="LoRA's learning-rate grid")
    parser.add_argument("--lora-ga-lrs", default="1e-4,3e-4,1e-3,3e-3", help="LoRA-GA's learning-rate grid")
    parser.add_argument("--window", type=int, default=10, help="steps in the trailing mean of the loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser.parse_args()


def tune(name: str, lrs: list[float], backbone, task, args) -> tuple[float, list[float], dict[float, float]]:
    """Train ``name`` at each lr; return the best lr (lowest final smoothed loss), its per-step loss, all finals."""
    settings = RunConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, progress=False,
                         head_init=args.head_init)
    curves, finals = {}, {}
    for lr in lrs:
        hparams = {"lr": lr} if args.warmup_ratio is None else {"lr": lr, "warmup_ratio": args.warmup_ratio}
        _, result = train_e2e(name, backbone, task, hparams, settings)
        finals[lr] = (float(smoothed_loss(result.loss_curve, args.window)[-1]) if result.diverged_at_step is None
                      else float("inf"))
        curves[lr] = result.loss_curve
    best = min(finals, key=finals.get)
    return best, curves[best], finals


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backbone = create_backbone(args.model, args.weights, args.model_kwargs, device=device)
    task = load_task(args.task, seed=0)
    lora_lr, lora, lora_finals = tune("lora", [float(x) for x in as_list(args.lora_lrs)], backbone, task, args)
    ga_lr, ga, ga_finals = tune("lora-ga", [float(x) for x in as_list(args.lora_ga_lrs)], backbone, task, args)

    target, steps = crossings({"LoRA": lora, "LoRA-GA": ga}, args.window)
    where = device.type.upper() + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    kwargs = f" {backbone.model_kwargs}" if backbone.model_kwargs else ""
    warmup = "each method's own" if args.warmup_ratio is None else f"{args.warmup_ratio:g} for both"
    schedules = ", ".join(f"{m} {get_method(m).defaults()['schedule']}" for m in ("lora", "lora-ga"))
    print(f"measured on a {args.weights}-weight {args.model}{kwargs} on {where}; task "
          f"{task.spec} ({task.sizes()['train']} train images, {task.num_classes} classes), {len(lora)} steps "
          f"({args.epochs} epochs) of batch {args.batch_size}, schedules {schedules} after {warmup} warm-up, head "
          f"{args.head_init}, loss = trailing mean over {args.window} steps")
    if args.weights == "random":
        print("note: random weights on a tiny ViT are a weak proxy; LoRA-GA's claim is about pretrained models")
    print("final training loss per lr  LoRA: " + ", ".join(f"{lr:g} -> {v:.4f}" for lr, v in lora_finals.items()))
    print("                         LoRA-GA: " + ", ".join(f"{lr:g} -> {v:.4f}" for lr, v in ga_finals.items()))
    for name, lr, grid in (("LoRA", lora_lr, lora_finals), ("LoRA-GA", ga_lr, ga_finals)):
        if lr in (min(grid), max(grid)):
            print(f"warning: {name}'s best lr {lr:g} is at the edge of its grid; widen the grid")
    init = get_method("lora-ga").defaults()["init_batches"]
    print(f"common target: {target:.4f}, the higher final smoothed loss of the two")
    print(f"LoRA    (best lr {lora_lr:g}): reaches it at step {steps['LoRA']} of {len(lora)}")
    print(f"LoRA-GA (best lr {ga_lr:g}): reaches it at step {steps['LoRA-GA']} of {len(ga)} (+{init} "
          "gradient-estimate batches)")
    ratio = steps["LoRA"] / steps["LoRA-GA"]
    print(f"steps ratio LoRA / LoRA-GA: {ratio:.2f}x (the paper's 2-4x: {'meets' if ratio >= 2 else 'misses'})")


if __name__ == "__main__":
    main()
