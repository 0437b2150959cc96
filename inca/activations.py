"""Where adapters read activations from: a finished on-disk store, or the live backbone.

Both yield the same batches for the same index arrays (trainers pass sorted indices), so a bank trained
from a cache and one trained live (rounded to the cache dtype) see identical data.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .backbone import Backbone
from .cache import ActivationCache
from .tasks import Task, image_loader


class CachedSource:
    """Activations gathered from memmaps: many epochs at disk/page-cache speed."""

    def __init__(self, cache: ActivationCache, layers: list[int] | None = None) -> None:
        self.cache = cache
        self.layers = sorted(layers) if layers is not None else cache.layers
        cache.check(layers=self.layers)

    def num_rows(self, split: str) -> int:
        return self.cache.num_rows(split)

    def labels(self, split: str) -> np.ndarray:
        return self.cache.labels(split)

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[dict[int, torch.Tensor], torch.Tensor]]:
        labels = self.labels(split)
        for rows in batches:
            features = {layer: self.cache.gather(split, layer, rows) for layer in self.layers}
            yield features, torch.from_numpy(labels[rows])


class LiveSource:
    """Activations computed on the fly: one backbone pass per batch feeds every layer.

    ``round_to`` rounds activations to a storage dtype (e.g. float16) so that results match a cache.
    The tensors are inference-mode tensors, not copied: read them (adapters standardise them first),
    never modify them in place or save them for backward.
    """

    def __init__(
        self,
        backbone: Backbone,
        task: Task,
        layers: list[int],
        num_workers: int | None = None,
        round_to: torch.dtype | None = None,
    ) -> None:
        self.backbone = backbone
        self.task = task
        self.layers = sorted(layers)
        self.num_workers = num_workers
        self.round_to = round_to
        self.forward_calls = 0

    def num_rows(self, split: str) -> int:
        return len(self.task.splits[split])

    def labels(self, split: str) -> np.ndarray:
        return self.task.splits[split].labels

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[dict[int, torch.Tensor], torch.Tensor]]:
        pin = self.backbone.device.type == "cuda"
        loader = image_loader(self.task.splits[split], self.backbone.transform, batches, self.num_workers, pin)
        for images, labels in loader:
            features = self.backbone.extract(images, self.layers)
            self.forward_calls += 1
            if self.round_to is not None:
                features = {k: v.to(self.round_to) for k, v in features.items()}
            yield features, labels
