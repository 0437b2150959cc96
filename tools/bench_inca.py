"""Benchmark folded InCA and InCA banks (figures from random data: they measure time, not accuracy).

1. One adapter, forward + backward, folded attention vs the ``nn.MultiheadAttention`` reference built from
   the same state dict (outputs checked equal), batch 32, T=197, at ViT-S/B/L widths.
2. Roofline of a bank step: the floating-point operations of one forward + backward (matrix products,
   counted from the shapes: :func:`step_flops`) over its time, next to the same run's dense
   ``[B*T, D] x [D, D]`` product rate; and the optimizer step's memory traffic over the same run's copy
   bandwidth (AdamW is bound by memory, not arithmetic).
3. Banks of adapters trained together (``train_bank``) vs the same adapters trained one by one (a plain
   ``InCA`` on its own layer + ``torch.optim.AdamW`` + cosine loop), same in-memory fp16 activations,
   batches and epochs. Banks of 16 (4 layers x 4 adapters) and 64 (4 x 16) by default.

Timings are the best of ``--repeats`` runs (as ``timeit`` reports: noise only ever adds time; small shared
machines get throttled for seconds at a time), the contenders interleaved so that noise hits both. Set the
thread count explicitly (``OMP_NUM_THREADS``): on a busy machine a second thread mostly waits at barriers.

    OMP_NUM_THREADS=2 python tools/bench_inca.py --device cpu --repeats 10
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from inca.activations import TensorSource
from inca.adapters.inca import AdapterSpec, InCA, InCABank, InCAReference, uses_weight_decay
from inca.devices import autocast
from inca.train.bank import epoch_batches, per_adapter_loss, train_bank
from inca.train.optim import BatchedAdamW, cosine_schedule

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


def train_step(module: torch.nn.Module, tokens: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    """Forward + backward, under ``dtype`` autocast when given."""
    device = tokens.device.type

    def run() -> None:
        module.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = module(tokens).float().logsumexp(-1).sum()
        loss.backward()

    return run


def adapter_vs_mha(device: torch.device, repeats: int, dim: int, heads: int, batch: int, tokens: int,
                   classes: int, dtype: torch.dtype | None = None) -> tuple[float, float, float]:  # fmt: skip
    """Milliseconds of a forward + backward of the ``nn.MultiheadAttention`` adapter and of folded InCA from
    the same state dict (``dtype`` autocast when given), and the largest relative difference of their outputs."""
    folded = InCA(dim, classes, heads, seed=0)
    with torch.no_grad():  # non-trivial weights everywhere (the zero-initialised head included)
        for p in folded.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    reference = InCAReference(dim, classes, heads)
    reference.load_state_dict(folded.state_dict())
    folded, reference = folded.to(device), reference.to(device)
    z = torch.randn(batch, tokens, dim, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        expected = reference(z).float()
        err = ((folded(z).float() - expected).abs().max() / expected.abs().max()).item()
    ms = interleaved(
        {"mha": train_step(reference, z, dtype), "folded": train_step(folded, z, dtype)}, repeats, device
    )
    return ms["mha"], ms["folded"], err


def bench_adapter(device: torch.device, repeats: int, batch: int, tokens: int, classes: int) -> None:
    print(f"\nInCA adapter, forward + backward, batch {batch}, T={tokens}, {classes} classes, fp32, {device}")
    print(f"{'width':>6} {'heads':>5} {'MHA ms':>9} {'folded ms':>10} {'speed-up':>9} {'max rel err':>12}")
    for dim, heads in WIDTHS:
        mha, folded, err = adapter_vs_mha(device, repeats, dim, heads, batch, tokens, classes)
        print(f"{dim:>6} {heads:>5} {mha:>9.2f} {folded:>10.2f} {mha / folded:>8.1f}x {err:>12.1e}")


@dataclass(frozen=True)
class BankSetting:
    """What the bank benchmarks run on: width and heads (ViT-B), distinct layers read, tokens, training rows of
    random fp16 activations, batch and epochs."""

    dim: int = 768
    heads: int = 12
    layers: int = 4
    tokens: int = 197
    rows: int = 256
    batch: int = 32
    epochs: int = 1
    classes: int = 10


def bank_specs(count: int, layers: int, heads: int) -> list[AdapterSpec]:
    """A hyper-parameter grid: layers x (heads H, H/2 with 2 queries) x learning rates 1e-3, 5e-4, ...,
    distinct seeds (16 adapters on 4 layers: 2 shapes x 2 learning rates per layer)."""
    shapes = [(heads, 1), (max(1, heads // 2), 2)]
    specs = []
    for i in range(count):
        j = i // layers  # the adapter's rank among those reading its layer
        heads_j, queries_j = shapes[j % 2]
        specs.append(AdapterSpec(layer=i % layers, num_heads=heads_j, num_queries=queries_j, lr=1e-3 / 2 ** (j // 2),
                                 seed=i))  # fmt: skip
    return specs


def step_flops(specs: list[AdapterSpec], dim: int, tokens: int, batch: int, classes: int) -> float:
    """Floating-point operations of one bank forward + backward: its matrix products, ``2 M N K`` each.

    Per adapter (m queries, H heads, F = mlp hidden width): the folded queries ``4 m D^2``, values and
    output projection ``4 B m D^2``, MLP ``4 B m D F``, head ``2 B D C``, each with a backward of twice
    its forward (both operands need gradients); token scores and pooling ``4 B T D H m``, whose backward
    equals the forward (the tokens are constants: only the queries and attention weights get gradients).
    Norms, softmax and element-wise work are not counted.
    """
    total = 0.0
    for s in specs:
        m, hidden = s.num_queries, int(dim * s.mlp_ratio)
        weights = 4 * m * dim**2 + 4 * batch * m * dim**2 + 4 * batch * m * dim * hidden + 2 * batch * dim * classes
        total += 3 * weights + 2 * 4 * batch * tokens * dim * s.num_heads * m
    return total


def bank_step(bank: InCABank, features: dict[int, torch.Tensor], labels: torch.Tensor) -> Callable[[], None]:
    """One forward + backward as ``train_bank`` runs it (gradients dropped first, like a fresh step)."""
    device = labels.device

    def run() -> None:
        for p in bank.parameters():
            p.grad = None
        with autocast(device):
            logits = bank(features)
        per_adapter_loss(logits.float(), labels).sum().backward()

    return run


def bank_roofline(setting: BankSetting, count: int, device: torch.device, repeats: int) -> dict[str, float]:
    """One bank step of ``count`` adapters against the hardware, interleaved: its forward + backward
    (``step`` ms, ``flops``) vs a dense ``[B*T, D] x [D, D]`` product (``dense`` ms, ``dense_flops``), and its
    optimizer step (``adamw`` ms, ``adamw_bytes``: 7 fp32 passes per parameter) vs a 64 MiB copy (``copy`` ms,
    ``copy_bytes``)."""
    d, b, t = setting.dim, setting.batch, setting.tokens
    g = torch.Generator().manual_seed(0)
    features = {layer: torch.randn(b, t, d, generator=g).half().to(device) for layer in range(setting.layers)}
    labels = torch.randint(0, setting.classes, (b,), generator=g).to(device)
    x, w = torch.randn(b * t, d, device=device), torch.randn(d, d, device=device)
    big = torch.randn(16 << 20, device=device)
    dst = torch.empty_like(big)
    specs = bank_specs(count, setting.layers, setting.heads)
    bank = InCABank(specs, d, setting.classes).to(device)
    optimizer = BatchedAdamW(bank.optimizer_groups())
    step = bank_step(bank, features, labels)
    step()  # gradients in place for the optimizer's runs
    adamw = partial(optimizer.step, 1e-6)  # tiny steps: the weights stay put over the repeats
    ms = interleaved(
        {"step": step, "dense": lambda: x @ w, "adamw": adamw, "copy": lambda: dst.copy_(big)}, repeats, device
    )
    params = sum(p.numel() for p in bank.parameters())
    return {
        **ms,
        "flops": step_flops(specs, d, t, b, setting.classes),
        "dense_flops": 2 * b * t * d * d,
        "adamw_bytes": 28 * params,
        "copy_bytes": 2 * 4 * big.numel(),
    }


def bench_roofline(setting: BankSetting, sizes: list[int], device: torch.device, repeats: int) -> None:
    print(f"\nRoofline of a bank step, width {setting.dim}, {setting.layers} layers, batch {setting.batch}, "
          f"T={setting.tokens}, fp16 activations, {device}")
    print(f"{'adapters':>8} {'GFLOP':>7} {'fwd+bwd ms':>11} {'GFLOP/s':>8} {'dense GFLOP/s':>14} {'of dense':>9}"
          f" {'AdamW ms':>9} {'GB/s':>6} {'copy GB/s':>10}")
    for count in sizes:
        r = bank_roofline(setting, count, device, repeats)
        rate, dense = r["flops"] / r["step"] / 1e6, r["dense_flops"] / r["dense"] / 1e6
        adam, copy_rate = r["adamw_bytes"] / r["adamw"] / 1e6, r["copy_bytes"] / r["copy"] / 1e6
        print(f"{count:>8} {r['flops'] / 1e9:>7.1f} {r['step']:>11.1f} {rate:>8.1f} {dense:>14.1f} {rate / dense:>8.0%}"
              f" {r['adamw']:>9.1f} {adam:>6.1f} {copy_rate:>10.1f}")


def train_separately(
    adapter: InCA, spec: AdapterSpec, source: TensorSource, epochs: int, batch: int, device: torch.device
) -> None:
    """One adapter, trained the plain way: InCA module, torch AdamW (fused where it exists), cosine."""
    adapter = adapter.to(device)
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


def bank_vs_separate(setting: BankSetting, counts: list[int], device: torch.device,
                     repeats: int) -> dict[int, dict[str, float]]:  # fmt: skip
    """Per bank size: milliseconds of ``train_bank`` on one bank (``bank``) and of training the same adapters
    one by one (``separate``, each reading only its own layer), interleaved, on the same random fp16 rows.
    Both start from copies of the same initial weights, made before the clock starts (initialising large
    adapters on the CPU would otherwise weigh as much as a short epoch on a GPU)."""
    g = torch.Generator().manual_seed(0)
    shape = (setting.rows, setting.tokens, setting.dim)
    features = {layer: torch.randn(shape, generator=g).half() for layer in range(setting.layers)}
    labels = {"train": np.random.default_rng(0).integers(0, setting.classes, setting.rows)}
    source = TensorSource({"train": features}, labels)
    alone = {layer: TensorSource({"train": {layer: t}}, labels) for layer, t in features.items()}
    out = {}
    for count in counts:
        specs = bank_specs(count, setting.layers, setting.heads)
        initial = InCABank(specs, setting.dim, setting.classes)
        adapters = [initial.adapter(i) for i in range(count)]

        def bank(initial: InCABank = initial) -> None:
            train_bank(copy.deepcopy(initial), source, epochs=setting.epochs, batch_size=setting.batch,
                       device=device, progress=False)  # fmt: skip

        def separate(specs: list[AdapterSpec] = specs, adapters: list[InCA] = adapters) -> None:
            for spec, adapter in zip(specs, adapters):
                train_separately(copy.deepcopy(adapter), spec, alone[spec.layer], setting.epochs, setting.batch,
                                 device)  # fmt: skip

        out[count] = interleaved({"bank": bank, "separate": separate}, repeats, device)
    return out


def bench_bank(setting: BankSetting, sizes: list[int], device: torch.device, repeats: int) -> None:
    print(f"\nBanks vs separate trainings (width {setting.dim}, {setting.layers} layers x heads {setting.heads}/1 "
          f"query and {max(1, setting.heads // 2)}/2 queries x learning rates), {setting.rows} fp16 rows of "
          f"T={setting.tokens}, batch {setting.batch}, {setting.epochs} epoch(s), {device}; each separate adapter "
          "reads only its layer")
    print(f"{'adapters':>8} {'separate ms':>12} {'bank ms':>10} {'speed-up':>9}")
    for count, ms in bank_vs_separate(setting, sizes, device, repeats).items():
        print(f"{count:>8} {ms['separate']:>12.1f} {ms['bank']:>10.1f} {ms['separate'] / ms['bank']:>8.1f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per contender (best reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--bank-sizes", default="16,64", help="adapters per bank, comma-separated")
    parser.add_argument("--bank-layers", type=int, default=4, help="distinct layers the bank's adapters read")
    parser.add_argument("--bank-dim", type=int, default=768)
    parser.add_argument("--bank-heads", type=int, default=12)
    parser.add_argument("--bank-rows", type=int, default=256)
    parser.add_argument("--bank-batch-size", type=int, default=32)
    parser.add_argument("--bank-epochs", type=int, default=1)
    parser.add_argument("--bank-repeats", type=int, default=3, help="timed epochs per contender (best reported)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["adapter", "roofline", "bank"],
                        help="benchmarks to skip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    sizes = [int(x) for x in args.bank_sizes.split(",")]
    setting = BankSetting(args.bank_dim, args.bank_heads, args.bank_layers, args.tokens, args.bank_rows,
                          args.bank_batch_size, args.bank_epochs)  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; figures from random data")
    if "adapter" not in args.skip:
        bench_adapter(device, args.repeats, args.batch_size, args.tokens, args.classes)
    if "roofline" not in args.skip:
        bench_roofline(setting, sizes, device, args.repeats)
    if "bank" not in args.skip:
        bench_bank(setting, sizes, device, args.bank_repeats)


if __name__ == "__main__":
    main()
