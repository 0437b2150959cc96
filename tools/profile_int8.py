"""Where an int8 store's batch costs its time against a float16 store's, kernel by kernel, on this machine.

An InCA epoch reads each batch of every layer from the store and standardises it (``inca.adapters.inca.standardise``)
before any adapter sees it. From a float16 store that is a gather of 2 bytes a value, one conversion to float32 and
the LayerNorm; from an int8 store, a gather of about 1.07 bytes a value, then the dequantisation (a conversion of
the int8 values, a multiply by their group's scale, a scatter of the float16 outliers) and the same LayerNorm.
This prints each step's time for one batch, the two paths interleaved (best and median of ``--repeats``), so that
the int8 epoch's ratio to float16 can be read off: the bytes an int8 store saves are worth the gather's
difference, the dequantisation costs the difference of the middle steps. "int8 x scale, one mixed op" times the
one fusion stock torch offers (``torch.mul`` of the int8 values by their float scales, without the outliers)
against "two kernels", the conversion and the in-place multiply the dequantisation runs.

    OMP_NUM_THREADS=1 python tools/profile_int8.py --dim 384 --tokens 197 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inca.adapters.inca import LN_EPS, standardise
from inca.quantize import QuantizedTokens, quantize


def timed(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each step over ``repeats`` rounds, the steps interleaved within a round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=384, help="token width (ViT-S: 384, ViT-L: 1024)")
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rows", type=int, default=256, help="rows of the memmapped layer gathered from")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.batch > args.rows:
        parser.error(f"--batch {args.batch} exceeds --rows {args.rows}: a batch is gathered from those rows")

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(args.rows, args.tokens, args.dim, generator=generator)
    tokens[:, 0, 5] = 300.0  # a massive activation, as trained ViTs carry
    packed = quantize(tokens)
    rows = np.sort(np.random.default_rng(0).permutation(args.rows)[: args.batch])
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "float16.npy", tokens.half().numpy())
        np.save(Path(tmp) / "int8.npy", packed.raw.numpy())
        halves = np.load(Path(tmp) / "float16.npy", mmap_mode="r")
        bytes8 = np.load(Path(tmp) / "int8.npy", mmap_mode="r")
        batch16 = torch.from_numpy(halves[rows])
        batch8 = QuantizedTokens(torch.from_numpy(bytes8[rows]), packed.layout)
        converted = batch8.dequantize()
        layout = packed.layout
        values = batch8.raw[..., : layout.dim].contiguous().view(-1, layout.group)
        scales = batch8.raw[..., layout.dim :].contiguous().view(torch.float16)[..., : layout.groups].reshape(-1, 1)
        steps = {
            "gather float16": lambda: torch.from_numpy(halves[rows]),
            "gather int8": lambda: torch.from_numpy(bytes8[rows]),
            "float16 -> float32": lambda: batch16.float(),
            "int8 dequantise": lambda: batch8.dequantize(),
            "int8 x scale, two kernels": lambda: values.float().mul_(scales.float()),
            "int8 x scale, one mixed op": lambda: torch.mul(values, scales.float()),
            "LayerNorm": lambda: F.layer_norm(converted, converted.shape[-1:], eps=LN_EPS),
            "standardise float16 (all)": lambda: standardise(torch.from_numpy(halves[rows])),
            "standardise int8 (all)": lambda: standardise(QuantizedTokens(torch.from_numpy(bytes8[rows]),
                                                                          packed.layout)),
        }
        times = timed(steps, args.repeats)
    print(f"one batch [{args.batch}, {args.tokens}, {args.dim}], {torch.get_num_threads()} thread(s), "
          f"best and median of {args.repeats}, interleaved")
    for name, seconds in times.items():
        print(f"  {name:<28} {min(seconds) * 1e3:7.2f} ms  {statistics.median(seconds) * 1e3:7.2f} ms")
    best = {name: min(seconds) for name, seconds in times.items()}
    ratio = best["standardise int8 (all)"] / best["standardise float16 (all)"]
    saved = best["gather float16"] - best["gather int8"]
    extra = best["int8 dequantise"] - best["float16 -> float32"]
    print(f"int8 / float16, whole standardisation: {ratio:.2f}x (best); the gather saves {saved * 1e3:.2f} ms, "
          f"the dequantisation costs {extra * 1e3:.2f} ms more than the conversion")


if __name__ == "__main__":
    main()
