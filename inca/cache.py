"""The on-disk activation store: build (resumable, byte-identical on resume), open (fingerprint-checked), verify.

Layout under ``$INCA_CACHE`` (default ``~/.cache/inca``)::

    <backbone>-<fp>/<task>-<fp>/manifest.json
                               <split>/labels.npy
                               <split>/layer_<k>.npy      [N, T, D] float16 (bfloat16 stored as uint16)
                               <split>/progress.json      rows committed so far

Rows are written into preallocated ``.npy`` memmaps batch by batch; every ``commit_seconds`` the memmaps are
flushed and only then ``progress.json`` is atomically replaced, so a killed build resumes from the last
committed row with the same batch boundaries and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from .backbone import Backbone
from .errors import InCAError
from .io import atomic_write, atomic_write_json, file_sha256, read_json
from .tasks import SPLITS, Task, image_loader, sequential_batches

_logger = logging.getLogger(__name__)

CACHE_VERSION = 1
DTYPES = {"float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.bfloat16)}
MANIFEST = "manifest.json"
PROGRESS = "progress.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$INCA_CACHE``, else ``~/.cache/inca``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("INCA_CACHE", Path.home() / ".cache" / "inca")).expanduser()


def store_path(cache_dir: str | os.PathLike | None, backbone: Backbone, task: Task) -> Path:
    root = cache_root(cache_dir)
    backbone_slug = backbone.name.replace("/", "_")
    return root / f"{backbone_slug}-{backbone.fingerprint}" / f"{task.slug}-{task.fingerprint}"


def store_bytes(backbone: Backbone, task: Task, layers: list[int], dtype: str = "float16") -> int:
    """Size of the activations of ``layers`` for all of ``task``: rows x tokens x width x layers x bytes."""
    item = np.dtype(DTYPES[dtype][0]).itemsize
    return sum(task.sizes().values()) * backbone.num_tokens * backbone.width * len(layers) * item


def layer_file(path: Path, split: str, layer: int) -> Path:
    return path / split / f"layer_{layer}.npy"


class ActivationCache:
    """A complete store, read zero-copy through memmaps."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise InCAError(f"{self.path} is not an activation store (no {MANIFEST}); build one with inca-cache")
        self.manifest: dict[str, Any] = read_json(manifest_file)
        if self.manifest.get("version") != CACHE_VERSION:
            raise InCAError(
                f"{self.path} was written by store version {self.manifest.get('version')}, "
                f"this inca reads version {CACHE_VERSION}: rebuild it with inca-cache"
            )
        if not self.manifest.get("complete"):
            raise InCAError(f"{self.path} is an unfinished build: rerun the same inca-cache command to resume it")
        self._arrays: dict[tuple[str, int], np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["task"]["classes"])

    def check(
        self, backbone: Backbone | None = None, task: Task | None = None, layers: list[int] | None = None
    ) -> None:
        """Refuse a store built from anything other than the requested backbone, task and layers."""
        if backbone is not None:
            _check_backbone(self.path, self.manifest, backbone)
        if task is not None and self.manifest["task"]["fingerprint"] != task.fingerprint:
            raise InCAError(
                f"{self.path} holds task {self.manifest['task']['spec']!r} "
                f"(fingerprint {self.manifest['task']['fingerprint']}), not {task.spec!r} ({task.fingerprint}): "
                "use another --cache-dir or rebuild"
            )
        if layers is not None:
            missing = sorted(set(layers) - set(self.layers))
            if missing:
                raise InCAError(
                    f"{self.path} holds layers {self.layers}, not {missing}: rebuild it with --layers "
                    f"{','.join(map(str, sorted(set(layers) | set(self.layers))))}"
                )

    def num_rows(self, split: str) -> int:
        return int(self.manifest["shapes"][split][0])

    def labels(self, split: str) -> np.ndarray:
        if split not in self._labels:
            self._labels[split] = np.load(self.path / split / "labels.npy")
        return self._labels[split]

    def layer(self, split: str, layer: int) -> np.ndarray:
        """The ``[N, T, D]`` memmap of one layer (bfloat16 stores come back as uint16 bit patterns)."""
        key = (split, layer)
        if key not in self._arrays:
            if layer not in self.layers:
                raise InCAError(f"{self.path} has no layer {layer}; it holds {self.layers}")
            self._arrays[key] = np.load(layer_file(self.path, split, layer), mmap_mode="r")
        return self._arrays[key]

    def gather(self, split: str, layer: int, rows: np.ndarray) -> torch.Tensor:
        """Rows of one layer as a torch tensor in the store's dtype (``rows`` sorted for sequential reads)."""
        array = np.ascontiguousarray(self.layer(split, layer)[rows])
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.manifest["dtype"] == "bfloat16" else tensor


def open_cache(
    path: str | os.PathLike,
    backbone: Backbone | None = None,
    task: Task | None = None,
    layers: list[int] | None = None,
) -> ActivationCache:
    cache = ActivationCache(path)
    cache.check(backbone, task, layers)
    return cache


def find_cache(
    cache_dir: str | os.PathLike | None, backbone: Backbone, task: Task, layers: list[int]
) -> ActivationCache | None:
    """The complete store for this backbone and task holding ``layers``, if one exists."""
    path = store_path(cache_dir, backbone, task)
    manifest = path / MANIFEST
    if not manifest.is_file() or not read_json(manifest).get("complete"):
        return None
    cache = ActivationCache(path)
    if not set(layers) <= set(cache.layers):
        return None
    cache.check(backbone, task, layers)
    return cache


def build_cache(
    backbone: Backbone,
    task: Task,
    layers: list[int],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    dtype: str = "float16",
    num_workers: int | None = None,
    commit_seconds: float = 10.0,
) -> ActivationCache:
    """Build (or resume, or reuse) the store of ``layers`` for ``task`` and return it opened."""
    if dtype not in DTYPES:
        raise InCAError(f"cache dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise InCAError(f"--batch-size must be positive, got {batch_size}")
    layers = sorted(set(layers))
    path = store_path(cache_dir, backbone, task)
    manifest = _start_or_resume(path, backbone, task, layers, batch_size, dtype)
    if not manifest["complete"]:
        batch_size = int(manifest["batch_size"])
        total = sum(task.sizes().values())
        done = sum(_rows_done(path, split) for split in SPLITS)
        with tqdm(total=total, initial=done, unit="img", desc=f"cache {task.spec}", leave=False) as bar:
            for split in SPLITS:
                _build_split(path, backbone, task, split, layers, batch_size, dtype, num_workers, commit_seconds, bar)
        manifest["checksums"] = {
            f"{split}/{file.name}": file_sha256(file)
            for split in SPLITS
            for file in sorted((path / split).glob("*.npy"))
        }
        manifest["complete"] = True
        atomic_write_json(path / MANIFEST, manifest)
        _logger.info("activation store complete: %s", path)
    return open_cache(path, backbone, task, layers)


def _start_or_resume(
    path: Path, backbone: Backbone, task: Task, layers: list[int], batch_size: int, dtype: str
) -> dict[str, Any]:
    manifest_file = path / MANIFEST
    if manifest_file.is_file():
        manifest = read_json(manifest_file)
        _check_backbone(path, manifest, backbone)
        if manifest["task"]["fingerprint"] != task.fingerprint:
            raise InCAError(f"{path} holds another task's activations ({manifest['task']['spec']}); remove it")
        if manifest["layers"] != layers or manifest["dtype"] != dtype:
            state = "holds" if manifest["complete"] else "is an unfinished build of"
            raise InCAError(
                f"{path} {state} layers {manifest['layers']} ({manifest['dtype']}), not {layers} ({dtype}): "
                f"rerun with --layers {','.join(map(str, manifest['layers']))}, or remove it, "
                "or use another --cache-dir"
            )
        if not manifest["complete"] and manifest["batch_size"] != batch_size:
            _logger.info("resuming with the batch size of the interrupted build (%d)", manifest["batch_size"])
        return manifest
    manifest = {
        "version": CACHE_VERSION,
        "backbone": backbone.describe(),
        "task": {**task.describe(), "identity": task.identity},
        "layers": layers,
        "dtype": dtype,
        "token_layout": backbone.token_layout,
        "shapes": {split: [n, backbone.num_tokens, backbone.width] for split, n in task.sizes().items()},
        "batch_size": batch_size,
        "complete": False,
        "checksums": {},
    }
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest_file, manifest)
    except OSError as exc:
        raise InCAError(
            f"cannot write the activation store at {path} ({exc.strerror}): pass a writable --cache-dir "
            "or set INCA_CACHE"
        ) from None
    return manifest


def _check_backbone(path: Path, manifest: dict[str, Any], backbone: Backbone) -> None:
    stored = manifest["backbone"]
    if stored["fingerprint"] == backbone.fingerprint:
        return
    current = backbone.describe()
    keys = ("name", "model_kwargs", "weights_hash", "preprocessing")
    differing = [key for key in keys if stored[key] != current[key]]
    raise InCAError(
        f"{path} was built from another backbone (differs in {', '.join(differing) or 'fingerprint'}): "
        "use the backbone, --weights and --model-kwargs it was built with, or another --cache-dir"
    )


def _rows_done(path: Path, split: str) -> int:
    progress = path / split / PROGRESS
    return int(read_json(progress)["rows"]) if progress.is_file() else 0


def _build_split(
    path: Path,
    backbone: Backbone,
    task: Task,
    split: str,
    layers: list[int],
    batch_size: int,
    dtype: str,
    num_workers: int | None,
    commit_seconds: float,
    bar: tqdm,
) -> None:
    data = task.splits[split]
    n = len(data)
    directory = path / split
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "labels.npy").is_file():
        atomic_write(directory / "labels.npy", lambda tmp: _save_npy(tmp, data.labels))
    done = _rows_done(path, split)
    if done >= n:
        return
    np_dtype, torch_dtype = DTYPES[dtype]
    shape = (n, backbone.num_tokens, backbone.width)
    arrays = {k: _open_layer(layer_file(path, split, k), shape, np_dtype, resume=done > 0) for k in layers}
    batches = sequential_batches(done, n, batch_size)
    last_commit = time.monotonic()
    pin = backbone.device.type == "cuda"
    for images, _ in image_loader(data, backbone.transform, batches, num_workers, pin_memory=pin):
        tokens = backbone.extract(images, layers)
        rows = slice(done, done + images.shape[0])
        for layer, value in tokens.items():
            value = value.to("cpu", torch_dtype)
            if not torch.isfinite(value).all():
                raise InCAError(
                    f"layer {layer} activations overflow {dtype} (task {task.spec}, rows {rows.start}..): "
                    "rebuild with --dtype bfloat16"
                )
            arrays[layer][rows] = value.view(torch.uint16).numpy() if dtype == "bfloat16" else value.numpy()
        done = rows.stop
        bar.update(images.shape[0])
        if done == n or time.monotonic() - last_commit >= commit_seconds:
            _commit(arrays, directory, done)
            last_commit = time.monotonic()


def _open_layer(file: Path, shape: tuple[int, ...], dtype: Any, resume: bool) -> np.memmap:
    if resume:
        if not file.is_file():
            raise InCAError(f"{file} is missing from an unfinished build: remove {file.parent.parent} and rebuild")
        array = open_memmap(file, mode="r+")
        if array.shape != shape or array.dtype != dtype:
            raise InCAError(f"{file} has shape {array.shape} {array.dtype}, expected {shape}: remove the store")
        return array
    return open_memmap(file, mode="w+", dtype=dtype, shape=shape)


def _commit(arrays: dict[int, np.memmap], directory: Path, rows: int) -> None:
    """Make written rows durable first, then advance the progress marker that resume trusts."""
    for array in arrays.values():
        array.flush()
    atomic_write_json(directory / PROGRESS, {"rows": rows})


def _save_npy(tmp: str, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, array)


def verify_cache(path: str | os.PathLike) -> dict[str, Any]:
    """Re-check a finished store: shapes, labels, committed rows and every file's checksum."""
    cache = ActivationCache(path)
    manifest = cache.manifest
    problems: list[str] = []
    num_classes = len(cache.classes)
    for split in SPLITS:
        shape = tuple(manifest["shapes"][split])
        labels = cache.labels(split)
        if labels.shape != shape[:1] or labels.min() < 0 or labels.max() >= num_classes:
            problems.append(f"{split}/labels.npy does not match {shape[0]} rows of {num_classes} classes")
        if _rows_done(cache.path, split) != shape[0]:
            problems.append(f"{split} has {_rows_done(cache.path, split)} of {shape[0]} rows committed")
        for layer in cache.layers:
            array = cache.layer(split, layer)
            if array.shape != shape:
                problems.append(f"{split}/layer_{layer}.npy has shape {array.shape}, manifest says {shape}")
    files = sorted(manifest["checksums"])
    for name in tqdm(files, desc="verify", unit="file", leave=False):
        file = cache.path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(file) != manifest["checksums"][name]:
            problems.append(f"{name} does not match its checksum")
    if problems:
        raise InCAError(f"{cache.path} failed verification: {'; '.join(problems[:4])}; rebuild it")
    return {
        "path": str(cache.path),
        "backbone": manifest["backbone"]["name"],
        "task": manifest["task"]["spec"],
        "layers": cache.layers,
        "rows": {split: manifest["shapes"][split][0] for split in SPLITS},
        "files": len(files),
    }
