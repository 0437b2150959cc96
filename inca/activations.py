"""Where every trainer reads its labelled data from: one :class:`DataSource` protocol for all of them.

The end-to-end methods read images (:class:`ImageBatches`) or model inputs held in memory
(:class:`TensorBatches`); adapters and probes read a backbone's activations, ``{layer: tokens}``
(:class:`ActivationSource`): from memory, a finished on-disk store, or the live backbone. Every source yields
the same batches for the same index arrays (trainers pass sorted indices), so a bank trained from a cache and
one trained live (rounded to the cache dtype) see identical data. :func:`open_source` is the one place that
decides between a store and the live backbone (for ``cache="auto"``, by measurement: :mod:`inca.placement`), and
where a store is served from.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from . import placement
from .adapters.inca import AdapterSpec
from .backbone import Backbone
from .cache import ActivationCache, build_cache, find_cache, open_cache, store_bytes, store_path, verify_cache
from .distributed import current
from .errors import InCAError
from .io import DEFAULT_MAX_STORE_GB, DEFAULT_MEMORY_FRACTION, cache_root, existing_parent
from .options import BATCH_SIZE, CACHE_MODES
from .placement import CacheDecision, Workload, decide, measure_rates
from .quantize import QuantizedTokens
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
    "narrow_source",
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
        """Yield ``(features {layer: [B, T, D] tokens}, labels [B] int64)`` for each index array in ``batches``, in
        order. Index arrays arrive sorted ascending. Tokens are float16/float32 tensors, or packed 8-bit
        :class:`~inca.quantize.QuantizedTokens` from an int8 store (dequantised by whoever reads them); on the CPU
        unless the source holds them on a GPU."""
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

    def narrowed(self, layers: list[int]) -> TensorSource:
        """The same rows with only ``layers`` (no copy): see :func:`narrow_source`."""
        return TensorSource({split: {layer: f[layer] for layer in layers} for split, f in self._features.items()},
                            self._labels)

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterable[tuple[dict[int, Tensor], Tensor]]:
        features, labels = self._features[self._split(split)], self._labels[split]
        for idx in batches:
            index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            yield {layer: t[index] for layer, t in features.items()}, torch.from_numpy(labels[idx])


class CachedSource:
    """Activations of a store: many epochs at disk/page-cache speed, or from memory.

    With ``device="disk"`` batches are gathered from the memmaps; with ``device="cpu"`` or a CUDA device the
    layers are loaded once, on first use of each split, into host memory (pinned when CUDA is in use) or GPU
    memory, and every batch is a gather there. Either way a background thread gathers the next batch while the
    caller works on the current one, so reading the store overlaps the adapters' compute. Batches land in pinned memory
    (asynchronous host-to-device copies) when ``pin_memory``, by default when this process already uses CUDA.
    ``decision`` is what ``cache="auto"`` measured to choose this source (None when it did not measure).
    """

    def __init__(
        self, cache: ActivationCache, layers: list[int] | None = None, pin_memory: bool | None = None,
        device: str = "disk",
    ) -> None:  # fmt: skip
        self.cache = cache
        self.layers = sorted(layers) if layers is not None else cache.layers
        self.pin_memory = pin_memory
        self.device = device
        self.decision: dict[str, Any] | None = None
        self._held: dict[str, dict[int, Tensor | QuantizedTokens]] = {}
        cache.check(layers=self.layers)

    def nbytes(self) -> int:
        """Bytes of the layers this source reads, over every split: what holding them in memory takes."""
        return self.cache.nbytes(self.layers)

    def num_rows(self, split: str) -> int:
        return self.cache.num_rows(split)

    def labels(self, split: str) -> np.ndarray:
        return self.cache.labels(split)

    def narrowed(self, layers: list[int]) -> CachedSource:
        """The same store reading only ``layers``' files (from the same place, sharing what is held in memory):
        see :func:`narrow_source`."""
        view = CachedSource(self.cache, layers, self.pin_memory, self.device)
        view._held = {split: {k: held[k] for k in layers} for split, held in self._held.items()}
        view.decision = self.decision
        return view

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[dict[int, Tensor], Tensor]]:
        labels = self.labels(split)
        pin = torch.cuda.is_initialized() if self.pin_memory is None else self.pin_memory
        held = self._hold(split, pin) if self.device != "disk" else None

        def read(rows: np.ndarray) -> tuple[dict[int, Tensor], Tensor]:
            if held is not None:  # a gather in memory
                index = torch.from_numpy(rows).to(next(iter(held.values())).device)
                features = {layer: tokens[index] for layer, tokens in held.items()}
            else:
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

    def _hold(self, split: str, pin: bool) -> dict[int, Tensor | QuantizedTokens]:
        """The split's layers in memory on this source's device, read from the store on first use."""
        if split not in self._held:
            rows = np.arange(self.num_rows(split))
            pin = pin and self.device == "cpu"
            self._held[split] = {layer: self.cache.gather(split, layer, rows, pin).to(self.device)
                                 for layer in self.layers}
            logger.info("%s: holding the %s split of layers %s in %s memory", self.cache.path, split, self.layers,
                        self.device)
        return self._held[split]


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
        self.decision: dict[str, Any] | None = None  # what cache="auto" measured to stream (None: no measurement)

    def narrowed(self, layers: list[int]) -> LiveSource:
        """The same images and transforms computing only up to the deepest of ``layers`` (a copy that counts its
        own :attr:`forward_calls`): see :func:`narrow_source`."""
        view = copy.copy(self)
        view.layers, view.forward_calls = sorted(layers), 0
        return view

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[dict[int, Tensor], Tensor]]:
        for images, labels in super().loader(split, batches):
            features = self.backbone.extract(images, self.layers)
            self.forward_calls += 1
            if self.round_to is not None:
                features = {k: v.to(self.round_to) for k, v in features.items()}
            yield features, labels


def narrow_source(source: ActivationSource, layers: Iterable[int]) -> ActivationSource:
    """``source`` serving only ``layers`` (some of its own): what a bank reads once successive halving has pruned
    every adapter of its other layers. A store then reads only those layers' files and the live backbone's pass
    stops at the deepest of them (the sources' ``narrowed``); any other source's batches are filtered."""
    layers = sorted(set(layers))
    missing = sorted(set(layers) - set(source.layers))
    if missing:
        raise InCAError(f"the activation source lacks layers {missing}; it serves {list(source.layers)}")
    if layers == sorted(source.layers):
        return source
    narrowed = getattr(source, "narrowed", None)
    return narrowed(layers) if narrowed is not None else _LayerFilter(source, layers)


class _LayerFilter:
    """Any :class:`ActivationSource` with only ``layers`` of each batch passed on."""

    def __init__(self, source: ActivationSource, layers: list[int]) -> None:
        self.source, self.layers = source, layers

    def num_rows(self, split: str) -> int:
        return self.source.num_rows(split)

    def labels(self, split: str) -> np.ndarray:
        return self.source.labels(split)

    def loader(self, split: str, batches: list[np.ndarray]) -> Iterator[tuple[dict[int, Tensor], Tensor]]:
        for features, labels in self.source.loader(split, batches):
            yield {layer: features[layer] for layer in self.layers}, labels


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
    dtype: str | None = "float16",
    max_gb: float = DEFAULT_MAX_STORE_GB,
    num_workers: int | None = None,
    train_transform: Callable | None = None,
    verify: bool = False,
    adapters: Sequence[AdapterSpec] | None = None,
    batch_size: int = BATCH_SIZE,
    cache_device: str = "auto",
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    device: torch.device | str | None = None,
) -> CachedSource | LiveSource:
    """The activations of ``layers`` for ``task``, to be read ``epochs`` times: a finished store when one
    exists (unless ``cache="never"``), a new store when ``cache`` is ``always`` or, for ``auto``, when it pays
    off (see :data:`CACHE_MODES`), else the live backbone. A ``train_transform`` (augmentation) always streams
    live: a store holds one fixed view of each image. ``verify`` re-hashes an existing store's files first.

    ``dtype`` is the store's element type; a store of another one is refused, never read in its place (None, for
    ``reuse``: whatever the store holds). With ``cache="auto"`` and no store yet, building one must pass the size
    and free-disk guards and then be predicted cheaper than streaming, by rates measured here for ``adapters``
    (default: one per layer) trained in batches of ``batch_size`` (:mod:`inca.placement`); the source's
    ``decision`` keeps the numbers. A store's layers are served from ``cache_device`` (``auto``, ``disk``,
    ``cpu``, ``cuda``; see :func:`inca.placement.cache_device`) for training on ``device`` (default: the
    backbone's)."""
    if cache not in CACHE_MODES:
        raise InCAError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
    if train_transform is not None:
        logger.info("%s: streaming live activations (augmented training images: a store holds one fixed view)",
                    task.name)
        return LiveSource(backbone, task, layers, num_workers, train_transform=train_transform)
    if cache == "never":
        return LiveSource(backbone, task, layers, num_workers)
    train_device = torch.device(device) if device is not None else backbone.device
    held_on = functools.partial(placement.cache_device, cache_device, train_device=train_device,
                                fraction=memory_fraction)
    world = current()  # ranks training one task data-parallel take rank 0's decision, and read its store
    plan = _Plan(backbone, task, sorted(layers), epochs, cache_dir, dtype or "float16", max_gb, num_workers,
                 list(adapters) if adapters else [AdapterSpec(layer=k, num_heads=backbone.num_heads) for k in layers],
                 batch_size, held_on)
    reason, found, decision = world.broadcast(plan.choose(cache, dtype, verify) if world.is_main else None)
    if reason:
        logger.info("%s: streaming live activations (%s)", task.name, reason)
        source: CachedSource | LiveSource = LiveSource(backbone, task, layers, num_workers)
    else:
        if found is not None:
            logger.info("%s: reading activations from %s", task.name, found)
            store = open_cache(found, backbone, task, layers, dtype)
        else:
            store = build_cache(backbone, task, layers, cache_dir, dtype=dtype or "float16", num_workers=num_workers)
        source = CachedSource(store, layers, device=held_on(store.nbytes(sorted(set(layers)))))
    source.decision = decision
    return source


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What :func:`open_source` weighs to read, build or stream: the task's layers, how they will be trained, and
    where a store would live."""

    backbone: Backbone
    task: Task
    layers: list[int]
    epochs: int
    cache_dir: str | os.PathLike | None
    dtype: str
    max_gb: float
    num_workers: int | None
    adapters: list[AdapterSpec]
    batch_size: int
    held_on: Callable[[int], str]  # where a store of so many bytes would be served from

    def choose(self, cache: str, dtype: str | None, verify: bool) -> tuple[str | None, str | None, dict | None]:
        """``(why to stream, None, decision)``, ``(None, the store of layers to read, None)`` (verified first with
        ``verify``), or ``(None, None, decision)`` to build one; ``decision`` is what ``auto`` measured (None for the
        other modes)."""
        found = find_cache(self.cache_dir, self.backbone, self.task, self.layers, dtype)
        if found is not None:
            if verify:
                verify_cache(found.path)
                logger.info("%s: every file of %s matches its checksum", self.task.name, found.path)
            return None, str(found.path), None
        if cache == "reuse":
            return "no activation store holds these layers, and this command builds none", None, None
        if cache != "auto":
            return None, None, None
        size = store_bytes(self.backbone, self.task, self.layers, self.dtype)
        reason = _why_not_build(size, self.epochs, self.max_gb, self.cache_dir)
        if reason:
            return reason, None, {"choice": "stream", "reason": reason}
        decision = self.measure(size)
        verdict = "building a store" if decision.choice == "build" else "streaming live activations"
        logger.info("%s: %s, measured cheaper: %s", self.task.name, verdict, decision.message())
        why = None if decision.choice == "build" else f"measured cheaper than a store: {decision.message()}"
        return why, None, decision.to_dict()

    def measure(self, size: int) -> CacheDecision:
        """Predict both runs from rates measured on this machine (:func:`inca.placement.measure_rates`)."""
        rates = measure_rates(self.backbone, self.task, self.layers, self.adapters, self.batch_size,
                              store_path(self.cache_dir, self.backbone, self.task).parent, size, self.dtype,
                              self.held_on(size), self.num_workers)
        rows = self.task.sizes()
        return decide(rates, Workload(rows, self.epochs, size // max(sum(rows.values()), 1)))


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
