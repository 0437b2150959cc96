"""Where every trainer reads its labelled data from: one :class:`DataSource` protocol for all of them.

The end-to-end methods read images (:class:`ImageBatches`) or model inputs held in memory
(:class:`TensorBatches`); adapters and probes read a backbone's activations, ``{layer: tokens}``
(:class:`ActivationSource`): from memory, a finished on-disk store, or the live backbone. Every source yields
the same batches for the same index arrays (trainers pass sorted indices), so a bank trained from a cache and
one trained live (rounded to the cache dtype) see identical data. :func:`open_source` is the one place that
decides between a store and the live backbone.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .backbone import Backbone
from .cache import ActivationCache, build_cache, find_cache, open_cache, store_bytes, verify_cache
from .distributed import current
from .errors import InCAError
from .io import DEFAULT_MAX_STORE_GB, cache_root, existing_parent
from .options import CACHE_MODES
from .tasks import Task, image_loader

__all__ = [
    "CACHE_MODES",
    "EVAL_BATCH_SIZE",
    "ActivationSource",
    "CachedSource",
    "DataSource",
    "ImageBatches",
    "LiveSource",
    "RecordingSource",
    "TensorBatches",
    "TensorSource",
    "open_source",
    "pool_tokens",
]

logger = logging.getLogger(__name__)

# Rows per batch when a split is only read forward (evaluation, recording pooled features): inca's own choice.
# Nothing is kept for a backward pass, so such a batch needs a fraction of a training batch's memory per row;
# 256 rows amortise the per-batch overhead while a ViT-B's tokens of one layer stay near 150 MB in float32.
EVAL_BATCH_SIZE = 256

# The largest share of the free disk a store that ``cache="auto"`` builds unasked may take: inca's own choice,
# leaving the other half to the runs' outputs and to everything else on that disk.
MAX_FREE_DISK_SHARE = 0.5


class DataSource(Protocol):
    """Labelled rows of a task's splits, served for arrays of row indices: what every trainer reads.

    A batch's inputs are what the model being trained takes: one tensor ``[B, ...]`` (images, or other model
    inputs such as pooled features), or a backbone's activations ``{layer: tokens [B, T, D]}``
    (an :class:`ActivationSource`)."""

    def num_rows(self, split: str) -> int: ...

    def labels(self, split: str) -> np.ndarray:
        """The ``[N]`` int64 labels of ``split``, in row order."""
        ...

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterable[tuple[Any, Tensor]]:
        """Yield ``(inputs, labels [B] int64)`` CPU tensors for each index array of ``batches``, in order."""
        ...


class ActivationSource(DataSource, Protocol):
    """A source of a backbone's activations (an activation store, the live backbone, memory): what InCA
    banks and the probes read."""

    layers: list[int]

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterable[tuple[dict[int, Tensor], Tensor]]:
        """Yield ``(features {layer: [B, T, D] float16/float32 CPU tensor}, labels [B] int64)`` for each
        index array in ``batches``, in order. Index arrays arrive sorted ascending."""
        ...


class ImageBatches:
    """A task's images through the backbone's eval preprocessing; with ``augment`` the train split goes
    through timm's training augmentation instead (:attr:`~inca.backbone.Backbone.train_transform`), drawn
    from torch's and Python's global RNGs (seed them for reproducibility)."""

    def __init__(self, task: Task, backbone: Backbone, num_workers: int | None = None, augment: bool = False) -> None:
        self.task = task
        self.transform = backbone.transform
        self.train_transform = backbone.train_transform if augment else self.transform
        self.num_workers = num_workers
        self.pin_memory = backbone.device.type == "cuda"

    def num_rows(self, split: str) -> int:
        return len(self.task.splits[split])

    def labels(self, split: str) -> np.ndarray:
        return self.task.splits[split].labels

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[Tensor, Tensor]]:
        transform = self.train_transform if split == "train" else self.transform
        return image_loader(self.task.splits[split], transform, batches, self.num_workers, self.pin_memory)


class TensorBatches:
    """Model inputs held in memory per split, ``inputs[split]`` ``[N, ...]`` with ``labels[split]`` ``[N]``
    (e.g. pooled backbone features for a linear probe)."""

    def __init__(self, inputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> None:
        self.inputs = dict(inputs)
        self._labels = dict(labels)

    def num_rows(self, split: str) -> int:
        return len(self._labels[split])

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split].numpy()

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in batches:
            index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            yield self.inputs[split][index], self._labels[split][index]


class TensorSource:
    """Activations held in memory: ``features[split][layer]`` tensors ``[N, T, D]``, ``labels[split]`` ``[N]``."""

    def __init__(self, features: Mapping[str, Mapping[int, Tensor]], labels: Mapping[str, np.ndarray | Tensor]):
        self._features = {split: dict(layers) for split, layers in features.items()}
        self._labels = {split: np.asarray(y, dtype=np.int64) for split, y in labels.items()}
        layer_sets = {tuple(sorted(layers)) for layers in self._features.values()}
        if len(layer_sets) != 1 or set(self._features) != set(self._labels):
            raise InCAError("TensorSource needs the same layers in every split and labels for every split")
        self.layers = list(layer_sets.pop())
        for split, layers in self._features.items():
            if any(t.shape[0] != len(self._labels[split]) for t in layers.values()):
                raise InCAError(f"TensorSource split {split!r}: features and labels differ in length")

    def _split(self, split: str) -> str:
        if split not in self._labels:
            raise InCAError(f"no split {split!r} in this activation source; it has {sorted(self._labels)}")
        return split

    def num_rows(self, split: str) -> int:
        return len(self._labels[self._split(split)])

    def labels(self, split: str) -> np.ndarray:
        return self._labels[self._split(split)]

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterable[tuple[dict[int, Tensor], Tensor]]:
        features, labels = self._features[self._split(split)], self._labels[split]
        for idx in batches:
            index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            yield {layer: t[index] for layer, t in features.items()}, torch.from_numpy(labels[idx])


class CachedSource:
    """Activations gathered from memmaps: many epochs at disk/page-cache speed.

    A background thread reads the next batch while the caller works on the current one, so reading the store
    overlaps the adapters' compute. Batches land in pinned memory (asynchronous host-to-device copies) when
    ``pin_memory``, by default when this process already uses CUDA.
    """

    def __init__(self, cache: ActivationCache, layers: list[int] | None = None, pin_memory: bool | None = None) -> None:
        self.cache = cache
        self.layers = sorted(layers) if layers is not None else cache.layers
        self.pin_memory = pin_memory
        cache.check(layers=self.layers)

    def num_rows(self, split: str) -> int:
        return self.cache.num_rows(split)

    def labels(self, split: str) -> np.ndarray:
        return self.cache.labels(split)

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[dict[int, Tensor], Tensor]]:
        labels = self.labels(split)
        pin = torch.cuda.is_initialized() if self.pin_memory is None else self.pin_memory

        def read(rows: np.ndarray) -> tuple[dict[int, Tensor], Tensor]:
            features = {layer: self.cache.gather(split, layer, rows, pin) for layer in self.layers}
            return features, torch.from_numpy(labels[rows])

        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = None
            for rows in batches:
                following = reader.submit(read, rows)
                if pending is not None:
                    yield pending.result()
                pending = following
            if pending is not None:
                yield pending.result()


class LiveSource(ImageBatches):
    """Activations computed on the fly: the task's images, one backbone pass per batch feeding every layer.

    ``round_to`` rounds activations to a storage dtype (e.g. float16) so that results match a cache.
    ``train_transform`` (e.g. :attr:`~inca.backbone.Backbone.train_transform`) preprocesses the train split
    instead of the eval transform: augmented views, new ones each epoch, which no store could hold.
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
        train_transform: Callable | None = None,
    ) -> None:
        super().__init__(task, backbone, num_workers)
        if train_transform is not None:
            self.train_transform = train_transform
        self.backbone = backbone
        self.layers = sorted(layers)
        self.round_to = round_to
        self.forward_calls = 0

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[dict[int, Tensor], Tensor]]:
        for images, labels in super().loader(split, batches):
            features = self.backbone.extract(images, self.layers)
            self.forward_calls += 1
            if self.round_to is not None:
                features = {k: v.to(self.round_to) for k, v in features.items()}
            yield features, labels


def pool_tokens(tokens: Tensor, pool: str, num_prefix: int) -> Tensor:
    """``[B, T, D] -> [B, D]``: the CLS token (the first prefix token), or the mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, num_prefix:].mean(1)


class RecordingSource:
    """A source that records what it serves, so that one backbone pass feeds several consumers (the probes).

    The first time a split's rows pass through, their pooled features (``pools``) are kept as float32 and,
    with ``keep_tokens``, the tokens themselves as float16: once a split is complete, further epochs read the
    kept tokens instead of the wrapped source.
    """

    def __init__(self, source: ActivationSource, pools: Sequence[str], num_prefix: int, keep_tokens: bool):
        self.source = source
        self.layers = source.layers
        self.pools = list(pools)
        self.num_prefix = num_prefix
        self.keep_tokens = keep_tokens
        self._pooled: dict[str, dict[tuple[int, str], np.ndarray]] = {}
        self._tokens: dict[str, dict[int, Tensor]] = {}
        self._seen: dict[str, np.ndarray] = {}

    def num_rows(self, split: str) -> int:
        return self.source.num_rows(split)

    def labels(self, split: str) -> np.ndarray:
        return self.source.labels(split)

    def _complete(self, split: str) -> bool:
        return split in self._seen and bool(self._seen[split].all())

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[dict[int, Tensor], Tensor]]:
        labels = self.labels(split)
        complete = self._complete(split)
        if self.keep_tokens and complete:
            tokens = self._tokens[split]
            for rows in batches:
                index = torch.from_numpy(rows)
                yield {layer: t[index] for layer, t in tokens.items()}, torch.from_numpy(labels[rows])
            return
        for rows, (features, batch_labels) in zip(batches, self.source.loader(split, batches)):
            if not complete:  # later streamed epochs would record the same values again
                self._record(split, rows, features)
            yield features, batch_labels

    def _record(self, split: str, rows: np.ndarray, features: dict[int, Tensor]) -> None:
        n = self.num_rows(split)
        if split not in self._seen:
            self._seen[split] = np.zeros(n, dtype=bool)
            self._pooled[split] = {}
            self._tokens[split] = {}
        for layer, tokens in features.items():
            for pool in self.pools:
                key = (layer, pool)
                if key not in self._pooled[split]:
                    self._pooled[split][key] = np.zeros((n, tokens.shape[-1]), dtype=np.float32)
                self._pooled[split][key][rows] = pool_tokens(tokens.float(), pool, self.num_prefix).cpu().numpy()
            if self.keep_tokens:
                if layer not in self._tokens[split]:
                    with torch.inference_mode(False):  # a first record made while evaluating must stay writable
                        self._tokens[split][layer] = torch.empty((n, *tokens.shape[1:]), dtype=torch.float16)
                self._tokens[split][layer][torch.from_numpy(rows)] = tokens.to("cpu", torch.float16)
        self._seen[split][rows] = True

    def pooled(self, split: str, layer: int, pool: str) -> np.ndarray:
        """``[N, D]`` pooled features of every row of ``split`` (one pass over the rows not seen yet).

        The recorded array itself, shared by every caller: read it, never modify it in place."""
        if not self._complete(split):
            missing = np.flatnonzero(~self._seen[split]) if split in self._seen else np.arange(self.num_rows(split))
            batches = [missing[i : i + EVAL_BATCH_SIZE] for i in range(0, len(missing), EVAL_BATCH_SIZE)]
            for _ in self.loader(split, batches):
                pass
        return self._pooled[split][(layer, pool)]


def open_source(
    backbone: Backbone,
    task: Task,
    layers: list[int],
    *,
    epochs: int,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    dtype: str = "float16",
    max_gb: float = DEFAULT_MAX_STORE_GB,
    num_workers: int | None = None,
    train_transform: Callable | None = None,
    verify: bool = False,
) -> CachedSource | LiveSource:
    """The activations of ``layers`` for ``task``, to be read ``epochs`` times: a finished store when one
    exists (unless ``cache="never"``), a new store when ``cache`` is ``always`` or, for ``auto``, when it pays
    off (see :data:`CACHE_MODES`), else the live backbone. A ``train_transform`` (augmentation) always streams
    live: a store holds one fixed view of each image. ``verify`` re-hashes an existing store's files first."""
    if cache not in CACHE_MODES:
        raise InCAError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
    if train_transform is not None:
        logger.info("%s: streaming live activations (augmented training images: a store holds one fixed view)",
                    task.spec)
        return LiveSource(backbone, task, layers, num_workers, train_transform=train_transform)
    if cache == "never":
        return LiveSource(backbone, task, layers, num_workers)
    world = current()  # ranks training one task data-parallel take rank 0's decision, and read its store
    reason, found = world.broadcast(
        _why_not_read_or_build(backbone, task, layers, epochs, cache, cache_dir, dtype, max_gb, verify)
        if world.is_main else None
    )
    if reason:
        logger.info("%s: streaming live activations (%s)", task.spec, reason)
        return LiveSource(backbone, task, layers, num_workers)
    if found is not None:
        logger.info("%s: reading activations from %s", task.spec, found)
        return CachedSource(open_cache(found, backbone, task, layers), layers)
    return CachedSource(build_cache(backbone, task, layers, cache_dir, dtype=dtype, num_workers=num_workers), layers)


def _why_not_read_or_build(
    backbone: Backbone, task: Task, layers: list[int], epochs: int, cache: str,
    cache_dir: str | os.PathLike | None, dtype: str, max_gb: float, verify: bool,
) -> tuple[str | None, str | None]:  # fmt: skip
    """``(why to stream, None)``, ``(None, the store of layers to read)`` (verified first with ``verify``), or
    ``(None, None)`` to build one."""
    found = find_cache(cache_dir, backbone, task, layers)
    if found is not None:
        if verify:
            verify_cache(found.path)
            logger.info("%s: every file of %s matches its checksum", task.spec, found.path)
        return None, str(found.path)
    if cache == "reuse":
        return "no activation store holds these layers, and this command builds none", None
    if cache == "auto":
        return _why_not_build(store_bytes(backbone, task, layers, dtype), epochs, max_gb, cache_dir), None
    return None, None


def _why_not_build(size: int, epochs: int, max_gb: float, cache_dir: str | os.PathLike | None) -> str | None:
    """Why ``cache="auto"`` streams instead of building a store of ``size`` bytes, or None to build it."""
    if epochs == 1:
        return "one epoch: a store would be read only once"
    if size > max_gb * 1e9:
        return f"a store would take {size / 1e9:.1f} GB > --cache-max-gb {max_gb:g}"
    free = shutil.disk_usage(existing_parent(cache_root(cache_dir))).free
    if size > MAX_FREE_DISK_SHARE * free:
        return f"a store would take {size / 1e9:.1f} GB of {free / 1e9:.1f} GB free disk"
    return None
