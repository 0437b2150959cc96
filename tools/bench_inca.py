"""Benchmark folded InCA and InCA banks (figures from random data: they measure time, not accuracy).

1. One adapter, forward + backward, folded attention vs the ``nn.MultiheadAttention`` reference built from
   the same state dict (outputs checked equal), batch 32, T=197, at ViT-S/B/L widths.
2. A bank of adapters trained together (``train_bank``) vs the same adapters trained one by one (a plain
   ``InCA`` + ``torch.optim.AdamW`` + cosine loop), same in-memory fp16 activations, batches and epochs.

Timings are the best of ``--repeats`` runs (as ``timeit`` reports: noise only ever adds time; small shared
machines get throttled for seconds at a time), the contenders interleaved so that noise hits both.

    python tools/bench_inca.py --device cpu --repeats 10
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from inca.activations import TensorSource
from inca.adapters.inca import AdapterSpec, InCA, InCABank, InCAReference, uses_weight_decay
from inca.devices import autocast
from inca.train.bank import epoch_batches, train_bank
from inca.train.optim import cosine_schedule

WIDTHS = [(384, 6), (768, 12), (1024, 16)]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best milliseconds per call of each function, calls interleaved, one warm-up each."""

    def once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    for fn in fns.values():
        once(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: min(t) for name, t in times.items()}


def train_step(module: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        module(tokens).logsumexp(-1).sum().backward()

    return run


def bench_adapter(device: torch.device, repeats: int, batch: int, tokens: int, classes: int) -> None:
    print(f"\nInCA adapter, forward + backward, batch {batch}, T={tokens}, {classes} classes, fp32, {device}")
    print(f"{'width':>6} {'heads':>5} {'MHA ms':>9} {'folded ms':>10} {'speed-up':>9} {'max rel err':>12}")
    for dim, heads in WIDTHS:
        folded = InCA(dim, classes, heads, seed=0)
        with torch.no_grad():  # non-trivial weights everywhere (the zero-initialised head included)
            for p in folded.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        reference = InCAReference(dim, classes, heads)
        reference.load_state_dict(folded.state_dict())
        folded, reference = folded.to(device), reference.to(device)
        z = torch.randn(batch, tokens, dim, device=device)
        with torch.no_grad():
            expected = reference(z)
            err = ((folded(z) - expected).abs().max() / expected.abs().max()).item()

        ms = interleaved({"mha": train_step(reference, z), "folded": train_step(folded, z)}, repeats, device)
        ratio = ms["mha"] / ms["folded"]
        print(f"{dim:>6} {heads:>5} {ms['mha']:>9.2f} {ms['folded']:>10.2f} {ratio:>8.1f}x {err:>12.1e}")


def bank_specs(count: int, layers: int, heads: int) -> list[AdapterSpec]:
    """A hyper-parameter grid: layers x (heads H, H/2 with 2 queries) x learning rates, distinct seeds."""
    shapes = [(heads, 1), (max(1, heads // 2), 2)]
    lrs = [1e-3, 3e-3]
    return [
        AdapterSpec(
            layer=i % layers,
            num_heads=shapes[(i // layers) % 2][0],
            num_queries=shapes[(i // layers) % 2][1],
            lr=lrs[(i // (2 * layers)) % 2],
            seed=i,
        )
        for i in range(count)
    ]


def train_separately(
    spec: AdapterSpec, dim: int, classes: int, source: TensorSource, epochs: int, batch: int, device: torch.device
) -> None:
    """One adapter, trained the plain way: InCA module, torch AdamW (fused where it exists), cosine."""
    adapter = InCA(dim, classes, spec.num_heads, spec.num_queries, spec.mlp_ratio, seed=spec.seed).to(device)
    named = list(adapter.named_parameters())
    groups = [
        {"params": [p for n, p in named if uses_weight_decay(n)], "weight_decay": spec.weight_decay},
        {"params": [p for n, p in named if not uses_weight_decay(n)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, fused=True)
    n = source.num_rows("train")
    steps = epochs * -(-n // batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, round(0.1 * steps)))
    for epoch in range(epochs):
        for features, labels in source.loader("train", epoch_batches(n, batch, 0, epoch)):
            with autocast(device):
                logits = adapter(features[spec.layer].to(device))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def bench_bank(device: torch.device, repeats: int, args: argparse.Namespace) -> None:
    specs = bank_specs(args.bank_adapters, args.bank_layers, args.bank_heads)
    dim, classes, n = args.bank_dim, 10, args.bank_rows
    g = torch.Generator().manual_seed(0)
    features = {layer: torch.randn(n, args.tokens, dim, generator=g).half() for layer in range(args.bank_layers)}
    source = TensorSource({"train": features}, {"train": np.random.default_rng(0).integers(0, classes, n)})
    print(
        f"\n{len(specs)} adapters (width {dim}, {args.bank_layers} layers x heads {args.bank_heads}/1 query and "
        f"{max(1, args.bank_heads // 2)}/2 queries x lr 1e-3/3e-3), {n} fp16 rows of T={args.tokens}, "
        f"batch {args.bank_batch_size}, {args.bank_epochs} epoch(s), {device}"
    )

    def bank() -> None:
        train_bank(
            InCABank(specs, dim, classes),
            source,
            epochs=args.bank_epochs,
            batch_size=args.bank_batch_size,
            device=device,
            progress=False,
        )

    def separate() -> None:
        for spec in specs:
            train_separately(spec, dim, classes, source, args.bank_epochs, args.bank_batch_size, device)

    ms = interleaved({"bank": bank, "separate": separate}, repeats, device)
    print(f"{'':>28} {'ms':>10}")
    print(f"{'separate trainings, total':>28} {ms['separate']:>10.1f}")
    print(f"{'one bank':>28} {ms['bank']:>10.1f}")
    print(f"{'speed-up':>28} {ms['separate'] / ms['bank']:>9.1f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per contender (best reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--bank-adapters", type=int, default=16)
    parser.add_argument("--bank-layers", type=int, default=4, help="distinct layers the bank's adapters read")
    parser.add_argument("--bank-dim", type=int, default=768)
    parser.add_argument("--bank-heads", type=int, default=12)
    parser.add_argument("--bank-rows", type=int, default=256)
    parser.add_argument("--bank-batch-size", type=int, default=32)
    parser.add_argument("--bank-epochs", type=int, default=1)
    parser.add_argument("--bank-repeats", type=int, default=5)
    parser.add_argument("--skip", choices=["adapter", "bank"], help="skip one of the two benchmarks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; figures from random data")
    if args.skip != "adapter":
        bench_adapter(device, args.repeats, args.batch_size, args.tokens, args.classes)
    if args.skip != "bank":
        bench_bank(device, args.bank_repeats, args)


if __name__ == "__main__":
    main()
