"""Task registry: spec strings to :class:`Task` objects, and image loading for the backbone.

Spec strings: ``digits``, ``synth-<kind>`` (shapes, count, orientation, colour), ``hf:NAME[:CONFIG]``,
``tv:NAME`` (with ``data_root``), ``folder:PATH``. The image loading names (``image_loader``, ``ImageDataset``,
...) load :mod:`inca.tasks.loading` (torch) on first use.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InCAError
from ..options import TASK_SPEC_FORMS
from .base import SPLITS, Split, Task
from .builtin import SYNTH_TASKS, load_digits_task, load_synth_task
from .folder import load_folder_task
from .hf import load_hf_task
from .tv import load_torchvision_task, torchvision_class

BUILTIN_TASKS = ["digits", *(f"synth-{kind}" for kind in SYNTH_TASKS)]
SPEC_HELP = TASK_SPEC_FORMS


def check_task_spec(spec: str, data_root: str | None = None) -> None:
    """Cheap checks of a task spec (its form, a folder's existence, a torchvision name and root), so a typo
    is reported before a backbone or any other task is loaded."""
    spec = spec.strip()
    prefix, _, rest = spec.partition(":")
    if spec == "digits" or spec.startswith("synth-") and spec[6:] in SYNTH_TASKS or prefix == "hf" and rest:
        return
    if prefix == "folder" and rest:
        if not Path(rest).expanduser().is_dir():
            raise InCAError(f"task {spec}: {rest} is not a directory; give folder:PATH with PATH/<class>/<images>")
        return
    if prefix == "tv" and rest:
        torchvision_class(spec, rest, data_root)
        return
    close = difflib.get_close_matches(spec, BUILTIN_TASKS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise InCAError(f"unknown task spec {spec!r}{hint}; use one of: {SPEC_HELP}")


def load_task(
    spec: str, data_root: str | None = None, download: bool = False, seed: int = 0, skip_bad_images: bool = False
) -> Task:
    """Load a task from its spec string. ``seed`` fixes how val/test are carved when a dataset lacks them;
    ``skip_bad_images`` drops unreadable image files (folder tasks) instead of refusing them."""
    check_task_spec(spec, data_root)
    spec = spec.strip()
    prefix, _, rest = spec.partition(":")
    if spec == "digits":
        return load_digits_task(seed=seed)
    if prefix == "hf":
        name, _, config = rest.partition(":")
        return load_hf_task(spec, name, config or None, seed=seed)
    if prefix == "tv":
        return load_torchvision_task(spec, rest, data_root, download=download, seed=seed)
    if prefix == "folder":
        return load_folder_task(spec, rest, seed=seed, skip_bad_images=skip_bad_images)
    return load_synth_task(spec[6:], seed=seed)


def parse_task_list(specs: str | Iterable[str]) -> list[str]:
    """``"digits,synth-count"`` or a list of such strings -> one spec per task."""
    items = [specs] if isinstance(specs, str) else list(specs)
    out = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not out:
        raise InCAError(f"no tasks given: pass --tasks, e.g. --tasks digits,synth-count ({SPEC_HELP})")
    return out


_LOADING = ("DECODE_WORKERS", "ImageDataset", "LoadFailure", "collate_images", "image_loader", "sequential_batches")

__all__ = ["SPLITS", "SPEC_HELP", "BUILTIN_TASKS", "check_task_spec", "Split", "Task", "load_task", "parse_task_list",
           *_LOADING]


def __getattr__(name: str) -> Any:
    if name in _LOADING:
        return getattr(importlib.import_module("inca.tasks.loading"), name)
    raise AttributeError(f"module 'inca.tasks' has no attribute {name!r}")
