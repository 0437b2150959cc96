"""Comparison methods, one module each, in one registry (PEFT-style).

A method module declares a config dataclass (typed :func:`~inca.methods.base.hparam` fields with help and
the source of each default), ``apply``/``save``/``load`` (or its own ``run``), and ends with one
:func:`register_method` call; adding a method is one new module plus one import line at the end of this file.
``inca-compare --help`` lists every registered method with its hyper-parameters.
"""

from inca.methods.base import HEAD_INITS, ApplyContext, MethodConfig, RunSettings, TrainConfig, hparam, lr_candidates
from inca.methods.registry import (
    METHODS,
    Method,
    get_method,
    methods_help,
    parse_method_args,
    register_method,
    resolve_methods,
)
from inca.methods.run import PEFT_DIR, build_model, probe_head, run_method, seeded, train_e2e

__all__ = [
    "HEAD_INITS",
    "METHODS",
    "PEFT_DIR",
    "ApplyContext",
    "Method",
    "MethodConfig",
    "RunSettings",
    "TrainConfig",
    "build_model",
    "get_method",
    "hparam",
    "lr_candidates",
    "methods_help",
    "parse_method_args",
    "probe_head",
    "register_method",
    "resolve_methods",
    "run_method",
    "seeded",
    "train_e2e",
]

# The built-in methods register themselves on import, in this order (the default --methods order).
from inca.methods import inca, lora, lora_ga, compacter, full, linear  # noqa: E402, F401, I001  isort: skip
