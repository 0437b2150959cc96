"""Training-loss curves as the benchmarks read them: :mod:`inca.convergence`'s trailing mean and first step at a
target, under the name that tools/proxy_results.py imports (run from the repository root, ``import curves`` finds
this file beside it)."""

from inca.convergence import smoothed_loss, steps_to_reach

__all__ = ["smoothed_loss", "steps_to_reach"]
