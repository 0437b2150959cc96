"""inca: parallel cross-attention adapters on frozen Vision Transformer activations.

The public API is importable from the package root (``from inca import InCA, MultiTaskInCA``). Names are
resolved on first use (PEP 562), so ``import inca`` is cheap and has no side effects; the command-line
tools import only what they run. The whole workflow is four calls (:mod:`inca.api`): ``probe_task`` /
``probe_suite`` (which layers?), ``train_suite`` (adapters for every task) and ``predict`` (images in, every
task's classes out).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # the workflow: what inca-probe, inca-train and inca-predict run
    "predict": "inca.api",
    "probe_suite": "inca.api",
    "probe_task": "inca.api",
    "train_suite": "inca.api",
    # backbone, data, activation store
    "Backbone": "inca.backbone",
    "create_backbone": "inca.backbone",
    "Task": "inca.tasks",
    "load_task": "inca.tasks",
    "register_task_source": "inca.tasks",
    "build_cache": "inca.cache",
    "open_cache": "inca.cache",
    # where activations come from
    "CachedSource": "inca.activations",
    "LiveSource": "inca.activations",
    "TensorSource": "inca.activations",
    "open_source": "inca.activations",
    # InCA adapters and banks
    "AdapterSpec": "inca.adapters.inca",
    "InCA": "inca.adapters.inca",
    "InCABank": "inca.adapters.inca",
    "OpenInCA": "inca.adapters.inca",
    "TaskAdapter": "inca.adapters.saved",
    "load_adapter": "inca.adapters.saved",
    "resign_adapter": "inca.adapters.saved",
    "save_adapter": "inca.adapters.saved",
    "BatchedAdamW": "inca.train.optim",
    "cosine_schedule": "inca.train.optim",
    "evaluate_bank": "inca.train.bank",
    "select_best": "inca.train.bank",
    "train_bank": "inca.train.bank",
    # images -> logits
    "InCAClassifier": "inca.inference",
    "MultiTaskInCA": "inca.inference",
    "export_onnx": "inca.export",
    # comparison methods on timm blocks
    "apply_compacter": "inca.adapters.compacter",
    "apply_lora": "inca.adapters.lora",
    "export_peft": "inca.adapters.peft_export",
    "init_lora_ga": "inca.adapters.lora_ga",
    "load_peft_export": "inca.adapters.peft_export",
    "merge_lora": "inca.adapters.lora",
    "MethodConfig": "inca.methods",
    "register_method": "inca.methods",
    # errors
    "InCAError": "inca.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'inca' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

