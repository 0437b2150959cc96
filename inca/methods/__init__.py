"""Comparison methods, one module each, in one registry (PEFT-style).

A method module declares a config dataclass (typed :func:`~inca.config.hparam` fields with help and the
source of each default), ``apply``/``save``/``load`` (or its own ``run``), and ends with one
:func:`register_method` call; a built-in is listed in :data:`METHODS`' built-ins, another package's method is
found through the ``inca.methods`` entry-point group (see :mod:`inca.registry`). ``inca-compare --help`` lists
every registered method with its hyper-parameters, without importing torch: the training entry points
(``run_method`` and friends) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from inca.methods.base import (
    HEAD_INITS,
    PEFT_DIR,
    ApplyContext,
    MethodConfig,
    RunConfig,
    TrainConfig,
    hparam,
    lr_candidates,
)
from inca.methods.registry import (
    METHODS,
    Method,
    get_method,
    methods_help,
    parse_method_args,
    register_method,
    resolve_methods,
)
from inca.methods.result import EndToEndResult, InCAResult, MethodResult

_TRAINING = ("build_model", "probe_head", "run_method", "seeded", "train_e2e")  # in inca.methods.run (torch)

__all__ = [
    "HEAD_INITS",
    "METHODS",
    "PEFT_DIR",
    "ApplyContext",
    "EndToEndResult",
    "InCAResult",
    "Method",
    "MethodConfig",
    "MethodResult",
    "RunConfig",
    "TrainConfig",
    "get_method",
    "hparam",
    "lr_candidates",
    "methods_help",
    "parse_method_args",
    "register_method",
    "resolve_methods",
    *_TRAINING,
]


def __getattr__(name: str) -> Any:
    if name in _TRAINING:
        return getattr(importlib.import_module("inca.methods.run"), name)
    raise AttributeError(f"module 'inca.methods' has no attribute {name!r}")
