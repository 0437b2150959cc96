"""Training-loss curves as the benchmarks read them: a trailing mean, and the step where it first reaches a
target (how fast LoRA-GA reaches LoRA's final training loss, the LoRA-GA paper's convergence claim).

Used by tools/bench_lora_ga.py and tools/proxy_results.py (run from the repository root, so ``import curves``
finds this file beside them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["smoothed_loss", "steps_to_reach"]


def smoothed_loss(curve: Sequence[float], window: int = 10) -> np.ndarray:
    """Trailing mean of a per-step loss: element t averages steps max(0, t - window + 1) .. t."""
    sums = np.cumsum(np.asarray(curve, dtype=np.float64))
    starts = np.maximum(np.arange(len(curve)) - window + 1, 0)
    return (sums - np.concatenate([[0.0], sums])[starts]) / (np.arange(len(curve)) - starts + 1)


def steps_to_reach(curve: Sequence[float], target: float, window: int = 10) -> int | None:
    """The first step (1-based) whose smoothed loss is at or below ``target``; None if it never is."""
    reached = np.flatnonzero(smoothed_loss(curve, window) <= target)
    return int(reached[0]) + 1 if reached.size else None
