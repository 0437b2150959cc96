"""Images of a split batched through the backbone's preprocessing (torch's DataLoader, imported on use)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import InCAError
from .base import Split

__all__ = ["DECODE_WORKERS", "ImageDataset", "LoadFailure", "collate_images", "image_loader", "sequential_batches"]

# Most worker processes decoding a file-backed split: inca's own choice, enough to keep one backbone's forward
# passes fed with typical JPEGs without a process (and its memory) per core on a large host.
DECODE_WORKERS = 8


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

    Sources that hold their images in memory (``source.in_memory``) decode in the main process, where workers
    would only add start-up and copying; file-backed ones in up to :data:`DECODE_WORKERS` workers
    (``num_workers`` overrides). An unreadable image raises a one-line :class:`InCAError` naming the file.
    """
    if num_workers is None:
        num_workers = 0 if split.source.in_memory else min(DECODE_WORKERS, os.cpu_count() or 1)
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
