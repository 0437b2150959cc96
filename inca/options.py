"""Typed option values: one validation for command-line flags and recipe values alike.

Each checker takes a flag's text (or a recipe's YAML value) and returns the typed value, or raises
:class:`argparse.ArgumentTypeError` with what is allowed; argparse turns that into one line naming the
flag, and :func:`check_value` applies the same checker to a recipe's value. Checks run before any work
starts, so a typo never costs a backbone load.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "cache_device",
    "check_value",
    "choice",
    "device",
    "fraction",
    "int_at_least",
    "layer_spec",
    "names",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "ratio",
    "seed",
]

Checker = Callable[[Any], Any]

# Pooling of a token sequence into one feature vector, by inca's name -> timm's ``global_pool`` name.
POOLS = {"cls": "token", "mean": "avg"}
# The nn.Linear layers the module-selecting methods (LoRA, LoRA-GA) adapt by default: every block's attention
# and MLP projections (here, not beside the torch code, so a method's config is read without importing torch).
DEFAULT_TARGET = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"

# The batch size of every command (inca-train, inca-probe, inca-compare, inca-cache, inca-predict) and of the library
# functions behind them, so that a probe, a training run and a comparison on the same backbone see batches of one
# size. 64: a ViT-B's tokens of all 12 layers for 64 images are 0.47 GB in float32; lower --batch-size when a model
# does not fit (the out-of-memory error says so).
BATCH_SIZE = 64

# Where a trainer reads activations from (inca.activations.open_source). auto: reuse a store, or build one when it
# pays off (several epochs, fits the budget and the disk), else live; always: reuse or build; never: live;
# reuse: a store only if one exists, never build one (inca-probe).
CACHE_MODES = ("auto", "always", "never", "reuse")
# The element types an activation store can hold (inca.cache.DTYPES maps each to its numpy and torch types; int8 is
# inca.quantize's packed 8-bit rows).
CACHE_DTYPES = ("float16", "bfloat16", "int8")
# Where a store's layers are served from each epoch (inca.placement.cache_device): auto picks by free memory; disk
# reads the memmaps (page cache included); cpu and cuda load them once into host or GPU memory.
CACHE_DEVICES = ("auto", "disk", "cpu", "cuda")


def _fail(value: Any, expected: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")


def _integer(value: Any, expected: str) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise _fail(value, expected)
    try:
        return int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
    except ValueError:
        raise _fail(value, expected) from None


def _number(value: Any, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _fail(value, expected)
    try:
        number = float(value)
    except ValueError:
        raise _fail(value, expected) from None
    if not math.isfinite(number):
        raise _fail(value, expected)
    return number


def _checker(parse: Callable[[Any, str], Any], expected: str, ok: Callable[[Any], bool] = lambda _: True) -> Checker:
    """A checker that parses with ``parse`` and accepts what ``ok`` allows; both failures say ``expected``."""

    def check(value: Any) -> Any:
        number = parse(value, expected)
        if not ok(number):
            raise _fail(value, expected)
        return number

    return check


positive_int = _checker(_integer, "a positive integer", lambda n: n >= 1)
non_negative_int = _checker(_integer, "an integer >= 0", lambda n: n >= 0)
positive_float = _checker(_number, "a finite number > 0", lambda x: x > 0)
non_negative_float = _checker(_number, "a finite number >= 0", lambda x: x >= 0)
ratio = _checker(_number, "a ratio in [0, 1)", lambda x: 0 <= x < 1)  # e.g. a warm-up ratio
fraction = _checker(_number, "a fraction in (0, 1]", lambda x: 0 < x <= 1)  # e.g. a share of free memory


def int_at_least(minimum: int) -> Checker:
    """An integer >= ``minimum`` (e.g. a halving rate, which must at least halve)."""
    return _checker(_integer, f"an integer >= {minimum}", lambda n: n >= minimum)

# Seeds reach numpy, torch and scikit-learn; the narrowest of them (numpy's legacy seeding behind scikit-learn's
# random_state) takes 0..2**32 - 1, so every seed flag does.
SEED_MAX = 2**32 - 1
seed = _checker(_integer, f"an integer >= 0 and <= {SEED_MAX} (a seed)", lambda n: 0 <= n <= SEED_MAX)


def choice(*allowed: str) -> Checker:
    """One of the ``allowed`` names (a flag's choices, as a check a recipe's value and a config field share)."""

    def check(value: Any) -> str:
        if value not in allowed:
            raise _fail(value, f"one of {', '.join(allowed)}")
        return value

    check.choices = allowed  # type: ignore[attr-defined]  # --help shows them as argparse's choices do
    return check


def cache_device(value: Any) -> str:
    """One of :data:`CACHE_DEVICES`; ``cuda`` only where torch sees a CUDA GPU (torch is imported for that value
    alone, so ``--help`` stays light)."""
    value = choice(*CACHE_DEVICES)(value)
    if value == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("cuda needs a CUDA GPU and none is available: use auto, disk or cpu")
    return value


cache_device.choices = CACHE_DEVICES  # type: ignore[attr-defined]  # --help shows them


def names(value: Any) -> str:
    """Comma-separated names (tasks, methods, probes), given as text or as a YAML list of them."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise _fail(value, "comma-separated names or a list of names")
    return ",".join(v.strip() for v in items)


def layer_spec(value: Any) -> str:
    """A layer spec (``all``, ``-1``, ``0,5,11``, ``last:K``, ``best:K``) as text, from text, an int or a list."""
    if isinstance(value, bool):
        raise _fail(value, "a layer spec: all, -1, 0,5,11, last:K or best:K")
    if isinstance(value, list):
        return ",".join(str(_integer(v, "a list of layer indices")) for v in value)
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str) or not re.fullmatch(r"\s*(all|(last|best):\s*\d+|-?\d+(\s*,\s*-?\d+)*)\s*", value):
        raise _fail(value, "a layer spec: all, -1, 0,5,11, last:K or best:K")
    return value.strip()


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def device(value: Any) -> str:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value.strip()):
        raise _fail(value, "auto, cpu, mps, cuda or cuda:N")
    return value.strip()


def check_value(action: argparse.Action, value: Any) -> Any:
    """A recipe's ``value`` for ``action``'s flag, checked and typed as the flag's text would be."""
    if action.nargs == 0:  # a switch (store_true / store_false)
        if not isinstance(value, bool):
            raise _fail(value, "true or false")
        return value
    many = action.nargs in ("*", "+") or action.nargs == argparse.REMAINDER
    if many:
        values = value if isinstance(value, list) else [value]
        if isinstance(value, dict) or any(isinstance(v, (dict, list)) for v in values):
            raise _fail(value, "a value or a list of values")
        return [_check_one(action, v) for v in values]
    if isinstance(value, dict) or isinstance(value, list) and action.type is None:
        raise _fail(value, "a single value")
    return _check_one(action, value)


def _check_one(action: argparse.Action, value: Any) -> Any:
    if action.type is None:
        if not isinstance(value, str):
            raise _fail(value, "a string")
        checked = value
    else:
        checked = action.type(value)
    if action.choices is not None and checked not in action.choices:
        raise _fail(value, f"one of {', '.join(map(str, action.choices))}")
    return checked
