"""Tasks: spec strings to :class:`Task` objects through the registered task sources, and image loading.

Built-in spec forms: ``digits``, ``synth-<kind>`` (shapes, count, orientation, colour), ``hf:NAME[:CONFIG]``,
``tv:NAME`` (with ``data_root``), ``folder:PATH``; other packages add theirs through the ``inca.task_sources``
entry-point group (see :mod:`inca.tasks.registry`). Importing this package imports no torch: the image loading
names (``image_loader``, ``ImageDataset``, ...) load :mod:`inca.tasks.loading` on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import SPLITS, Split, Task, by_task_name, task_name, task_names
from .registry import (
    BUILTIN_SOURCES,
    TASK_SOURCES,
    TaskLoadConfig,
    TaskSource,
    add_task_source_flags,
    canonical_task_spec,
    check_task_spec,
    check_task_specs,
    find_task_source,
    load_task,
    parse_task_list,
    register_task_source,
    task_settings,
    task_sources_help,
    task_spec_forms,
)

_LOADING = ("DECODE_WORKERS", "ImageDataset", "LoadFailure", "collate_images", "image_loader", "sequential_batches")

__all__ = [
    "SPLITS",
    "TASK_SOURCES",
    "Split",
    "Task",
    "TaskLoadConfig",
    "TaskSource",
    "add_task_source_flags",
    "by_task_name",
    "canonical_task_spec",
    "check_task_spec",
    "check_task_specs",
    "find_task_source",
    "load_task",
    "parse_task_list",
    "register_task_source",
    "task_name",
    "task_names",
    "task_settings",
    "task_sources_help",
    "task_spec_forms",
    *_LOADING,
]

# The built-in sources register in their listed order whichever of their modules is imported first, so the spec
# forms of --help and of error messages keep that order.
for _module in BUILTIN_SOURCES:
    importlib.import_module(_module)


def __getattr__(name: str) -> Any:
    if name in _LOADING:
        return getattr(importlib.import_module("inca.tasks.loading"), name)
    raise AttributeError(f"module 'inca.tasks' has no attribute {name!r}")
