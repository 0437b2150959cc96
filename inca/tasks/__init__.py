"""Task registry: spec strings to :class:`Task` objects, and image loading for the backbone.

Spec strings: ``digits``, ``synth-<kind>`` (shapes, count, orientation, colour), ``hf:NAME[:CONFIG]``,
``tv:NAME`` (with ``data_root``), ``folder:PATH``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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


@dataclass
class LoadFailure:
    """Returned by a worker instead of raising, so the error reaches the user as one line."""

    message: str


class ImageDataset(Dataset):
    """A split's images through the backbone's preprocessing, with their labels."""

    def __init__(self, split: Split, transform: Callable) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        try:
            return self.transform(self.split.image(index)), int(self.split.labels[index])
        except InCAError as exc:
            return LoadFailure(str(exc))


def collate_images(items: list) -> tuple[torch.Tensor, torch.Tensor] | LoadFailure:
    """Stack a batch; a failed image turns the batch into that failure (raised in the main process)."""
    failure = next((item for item in items if isinstance(item, LoadFailure)), None)
    if failure is not None:
        return failure
    images, labels = zip(*items)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)


def image_loader(
    split: Split,
    transform: Callable,
    batches: list[np.ndarray],
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of preprocessed images for the given index arrays, in order.

    In-memory tasks decode in the main process; file-backed ones in workers (``num_workers`` overrides).
    An unreadable image raises a one-line :class:`InCAError` naming the file.
    """
    if num_workers is None:
        in_memory = type(split.source).__name__ == "ArraySource"
        num_workers = 0 if in_memory else min(8, os.cpu_count() or 1)
    loader = DataLoader(
        ImageDataset(split, transform),
        batch_sampler=[b.tolist() for b in batches],
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
    )
    for batch in loader:
        if isinstance(batch, LoadFailure):
            raise InCAError(batch.message)
        yield batch


def sequential_batches(start: int, stop: int, batch_size: int) -> list[np.ndarray]:
    """Consecutive index arrays ``[start, start+bs), ...`` up to ``stop``."""
    return [np.arange(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]


__all__ = [
    "SPLITS", "SPEC_HELP", "BUILTIN_TASKS", "check_task_spec", "ImageDataset", "LoadFailure", "Split", "Task",
    "collate_images", "image_loader", "load_task", "parse_task_list", "sequential_batches",
]
