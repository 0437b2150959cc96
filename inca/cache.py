"""The on-disk activation store: build (resumable, byte-identical on resume), open (fingerprint-checked), verify.

Layout under ``$INCA_CACHE`` (default ``~/.cache/inca``)::

    <backbone>-<fp>/<task>-<fp>/manifest.json
                               <split>/labels.npy
                               <split>/layer_<k>.npy      [N, T, D] float16 (bfloat16 stored as uint16), or
                                                          [N, T, W] int8: packed 8-bit rows (inca.quantize)
                               <split>/progress-<r>.json  rows committed by the writer starting at row r
                                                          (while a build runs; removed when it completes)

Rows are written into preallocated ``.npy`` memmaps batch by batch; every ``commit_seconds`` the memmaps are
flushed and only then the writer's progress file is atomically replaced, so a killed build resumes from the
last committed rows with the same batch boundaries and ends byte-identical to an uninterrupted one. Under
``torchrun`` the batches still to write are split into one contiguous shard per rank (see
:mod:`inca.distributed`; across machines the store must be on a shared file system), each rank writing its
rows into the shared memmaps; a rerun with any number of ranks writes only the batches no progress file
covers. A store asked for layers it lacks is *extended* (one more resumable pass writes only the missing
layers; the others stay readable meanwhile). Builds hold a lock on the store directory, check free space and
preallocate the layer files first (a full disk is one line, never a ``Bus error``), and create files with
``O_EXCL | O_NOFOLLOW``.

Opening a store checks what is cheap: the manifest's schema and its own SHA-256 (a hand-edited manifest is
refused), every file's presence, ``.npy`` header and size against the manifest. :func:`verify_cache` also
re-hashes every file. A store of another dtype than the one asked for is refused, never read in its place.

**8-bit stores** (``dtype="int8"``) quantise each token on its own, as it is written (:mod:`inca.quantize`):
per-token scales over groups of up to 64 channels, with each token's ``D // 96`` largest values kept in float16;
0.536x the bytes of float16, scales included. The manifest records the scheme (``quantization``), and a store of
another scheme is refused. Why this scheme, measured with ``tools/bench_activations.py --only schemes`` (worst
layer; "rest": the cosine of each token's channels but its 4 largest, what a crushed token loses; "massive": the
same tokens with four channels 20x larger everywhere and, in 2% of the tokens, two channels at 300x the median,
the outliers Darcet et al. 2024 and Sun et al. 2024 find in trained ViTs)::

                                          bytes   ViT-S/16 random   ViT-S + massive   proxy (learned)  proxy + massive
                                         x fp16   cos min           cos min   rest    cos min   rest   rest
    one scale per token                   0.503   0.99994           0.99909  0.88208  0.99989  0.99982  0.87397
    one scale per channel (fit on train)  0.500   0.99972           0.99821  0.99754  0.99611  0.99597  0.99559
    per-token groups of 64                0.516   0.99997           0.99980  0.95648  0.99993  0.99988  0.90579
    SmoothQuant + groups of 64 (train)    0.516   0.99998           0.99996  0.99915  0.99996  0.99993  0.99692
    groups + outliers in float16 (inca)   0.536   0.99998           0.99999  0.99986  0.99996  0.99994  0.99657

(ViT-S/16: timm's random init at 224 px, layers 8-11 of 128 synth-shapes images; proxy: the learned 6-block ViT-Ti
of docs/results.md, all layers of 512 images.) Scales per channel fitted on the train split miss the 0.999 target
on the learned proxy even without added outliers; one scale per token, or per group of its channels, rounds the
other channels of a token with massive activations to a few levels. Smoothing channels first (SmoothQuant, Xiao et
al., ICML 2023, alpha 0.5) and keeping each token's largest values apart do about equally well; the latter needs
nothing but the token itself (no pass over the train split before the first row is written, no fitted vector a
resumed or sharded build must reproduce), so every batch is quantised alone and a resumed build stays byte-identical.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap

from . import options as opt
from .backbone import Backbone
from .distributed import World, current
from .errors import InCAError, first_line, require_positive
from .io import (
    LOCK_FILE,
    atomic_write,
    atomic_write_json,
    cache_root,
    digest,
    directory_lock,
    file_sha256,
    read_json,
    refuse_symlink,
    remove_stale_temps,
    require_free_space,
)
from .progress import progress
from .quantize import INT8_SCHEME, Int8Layout, QuantizedTokens, quantize
from .tasks import SPLITS, Task, image_loader, sequential_batches

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
DTYPES = {"float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.bfloat16),
          "int8": (np.int8, torch.int8)}  # int8: packed rows of inca.quantize's scheme
MANIFEST = "manifest.json"
REBUILD_HINT = "rebuild the store with inca-cache --rebuild (same --backbone, --task and --layers)"


def store_path(cache_dir: str | os.PathLike | None, backbone: Backbone, task: Task) -> Path:
    root = cache_root(cache_dir)
    backbone_slug = backbone.name.replace("/", "_")
    return root / f"{backbone_slug}-{backbone.fingerprint}" / f"{task.slug}-{task.fingerprint}"


def store_bytes(backbone: Backbone, task: Task, layers: list[int], dtype: str = "float16") -> int:
    """Size of the activations of ``layers`` for all of ``task``: rows x tokens x row bytes x layers."""
    return sum(task.sizes().values()) * backbone.num_tokens * row_bytes(dtype, backbone.width) * len(layers)


def row_bytes(dtype: str, dim: int) -> int:
    """Bytes of one stored token of width ``dim``: 2 a value in 16 bits, a packed 8-bit row for int8."""
    return Int8Layout(dim).width if dtype == "int8" else dim * np.dtype(DTYPES[dtype][0]).itemsize


def file_shape(dtype: str, shape: Any) -> tuple[int, int, int]:
    """The ``.npy`` shape of a layer of activations ``[N, T, D]``: ``[N, T, W]`` packed rows for int8."""
    n, t, d = (int(x) for x in shape)
    return (n, t, Int8Layout(d).width) if dtype == "int8" else (n, t, d)


def layer_file(path: Path, split: str, layer: int) -> Path:
    return path / split / f"layer_{layer}.npy"


class ActivationCache:
    """A complete store, read zero-copy through memmaps."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        if not self.manifest["complete"]:
            raise InCAError(f"{self.path} is an unfinished build: rerun the same inca-cache command to resume it")
        check_files(self.path, self.manifest)
        self._arrays: dict[tuple[str, int], np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["task"]["classes"])

    def check(
        self, backbone: Backbone | None = None, task: Task | None = None, layers: list[int] | None = None,
        dtype: str | None = None,
    ) -> None:
        """Refuse a store built from anything other than the requested backbone, task, layers and dtype."""
        if dtype is not None and dtype != self.dtype:
            raise InCAError(
                f"{self.path} holds {self.dtype} activations, not {dtype}: read it with --cache-dtype {self.dtype}, "
                f"or rebuild it as {dtype} with inca-cache --rebuild --dtype {dtype}"
            )
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
                    f"{self.path} holds layers {self.layers}, not {missing}: extend it with inca-cache --layers "
                    f"{','.join(map(str, sorted(set(layers) | set(self.layers))))} (the other layers are kept)"
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

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    def nbytes(self, layers: list[int] | None = None) -> int:
        """Bytes of the files of ``layers`` (default: all) over every split."""
        return sum(layer_file(self.path, split, k).stat().st_size for split in SPLITS
                   for k in (self.layers if layers is None else layers))

    def gather(
        self, split: str, layer: int, rows: np.ndarray, pin_memory: bool = False
    ) -> torch.Tensor | QuantizedTokens:
        """Rows of one layer in the store's dtype, in ``rows`` order: a tensor, or for an int8 store the packed
        :class:`~inca.quantize.QuantizedTokens` (dequantised by whoever reads them, e.g. the adapters).

        Each run of consecutive rows is one slice of the memmap (one sequential read) copied straight into
        the output, pinned for asynchronous host-to-device copies when ``pin_memory``.
        """
        array = self.layer(split, layer)
        out = torch.empty((len(rows), *array.shape[1:]), dtype=DTYPES[self.dtype][1], pin_memory=pin_memory)
        # bfloat16: the stored uint16 bit patterns
        target = out.numpy() if self.dtype == "int8" else out.view(torch.int16).numpy().view(array.dtype)
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # where each run of consecutive rows begins
        for start, stop in zip(starts, [*starts[1:], len(rows)]):
            target[start:stop] = array[rows[start] : rows[start] + stop - start]
        if self.dtype == "int8":
            return QuantizedTokens(out, Int8Layout(int(self.manifest["shapes"][split][2])))
        return out


def open_cache(
    path: str | os.PathLike,
    backbone: Backbone | None = None,
    task: Task | None = None,
    layers: list[int] | None = None,
    dtype: str | None = None,
) -> ActivationCache:
    cache = ActivationCache(path)
    cache.check(backbone, task, layers, dtype)
    return cache


def find_cache(
    cache_dir: str | os.PathLike | None, backbone: Backbone, task: Task, layers: list[int], dtype: str | None = None
) -> ActivationCache | None:
    """The complete store for this backbone and task holding ``layers``, if one exists. One of another dtype than
    ``dtype`` (None: any) is refused with one line, never read in its place."""
    path = store_path(cache_dir, backbone, task)
    if not (path / MANIFEST).is_file() or not read_manifest(path)["complete"]:
        return None
    cache = ActivationCache(path)
    if not set(layers) <= set(cache.layers):
        return None
    cache.check(backbone, task, layers, dtype)
    return cache


def build_cache(
    backbone: Backbone,
    task: Task,
    layers: list[int],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = opt.BATCH_SIZE,
    dtype: str = "float16",
    num_workers: int | None = None,
    commit_seconds: float = 10.0,
    rebuild: bool = False,
) -> ActivationCache:
    """Build, resume, extend (with layers it lacks) or reuse the store of ``task`` and return it opened for
    ``layers``. ``rebuild`` deletes an existing store of this backbone and task first.

    ``batch_size`` (images per backbone pass) and ``commit_seconds`` are inca's own choice: every command's batch
    (:data:`inca.options.BATCH_SIZE`), and a commit every 10 s loses at most 10 s of a killed build while its
    flushes stay a small share of the time."""
    if dtype not in DTYPES:
        raise InCAError(f"cache dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    require_positive(batch_size=batch_size)
    layers = sorted(set(layers))
    path = store_path(cache_dir, backbone, task)
    refuse_symlink(path.parent, "the activation stores' folder")  # the store itself: directory_lock refuses one
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InCAError(f"cannot create the activation store at {path} ({exc.strerror}): pass a writable "
                        "--cache-dir or set INCA_CACHE") from None
    world = current()  # under torchrun: each rank writes a shard of the rows; rank 0 locks and records
    path = Path(world.broadcast(str(path)))  # rank 0's store, even if another rank would name it otherwise
    with directory_lock(path, "the activation store") if world.is_main else contextlib.nullcontext():
        if world.is_main:
            remove_stale_temps(path)
            if rebuild:
                _remove_store(path)
        while True:
            manifest = world.broadcast(
                _start_or_resume(path, backbone, task, layers, batch_size, dtype) if world.is_main else None
            )
            if manifest["pending"] is None:
                break
            _build_pending(path, manifest, backbone, task, num_workers, commit_seconds, world)
    return open_cache(path, backbone, task, layers)


def _remove_store(path: Path) -> None:
    """Delete a store's files (not the lock file this process holds)."""
    for entry in path.iterdir():
        if entry.name != LOCK_FILE:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    logger.info("removed the activation store %s to rebuild it", path)


def _start_or_resume(
    path: Path, backbone: Backbone, task: Task, layers: list[int], batch_size: int, dtype: str
) -> dict[str, Any]:
    """The store's manifest with ``pending`` set to the layers still to write (None when it holds ``layers``):
    a new store's layers, an interrupted build's, or the layers an existing store lacks."""
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        _check_backbone(path, manifest, backbone)
        if manifest["task"]["fingerprint"] != task.fingerprint:
            raise InCAError(f"{path} holds another task's activations ({manifest['task']['spec']}); rebuild it "
                            "with inca-cache --rebuild")
        if manifest["dtype"] != dtype:
            raise InCAError(f"{path} stores {manifest['dtype']} activations, not {dtype}: ask for "
                            f"{manifest['dtype']} (--dtype / --cache-dtype) or rebuild with inca-cache --rebuild")
        _check_scheme(path, manifest)
        missing = sorted(set(layers) - set(manifest["layers"]))
        if manifest["pending"] is None and missing:
            logger.info("%s holds layers %s: extending it with layers %s (one more pass over the data)",
                        path, manifest["layers"], missing)
            _require_space(path, manifest, missing)
            manifest["pending"] = {"layers": missing, "batch_size": batch_size}
            write_manifest(path, manifest)
        elif manifest["pending"] is not None:
            _require_space(path, manifest, manifest["pending"]["layers"])
            if manifest["pending"]["batch_size"] != batch_size:
                logger.info("resuming with the batch size of the interrupted build (%d)",
                            manifest["pending"]["batch_size"])
        return manifest
    manifest = {
        "version": CACHE_VERSION,
        "backbone": backbone.describe(),
        "task": {**task.describe(), "identity": task.identity},
        "layers": [],
        "pending": {"layers": layers, "batch_size": batch_size},
        "dtype": dtype,
        **({"quantization": INT8_SCHEME} if dtype == "int8" else {}),
        "token_layout": backbone.token_layout,
        "shapes": {split: [n, backbone.num_tokens, backbone.width] for split, n in task.sizes().items()},
        "complete": False,
        "checksums": {},
    }
    _require_space(path, manifest, layers)
    write_manifest(path, manifest)
    return manifest


def _require_space(path: Path, manifest: dict[str, Any], layers: list[int]) -> None:
    """Refuse (before the manifest records the build) when the disk cannot hold what ``layers`` still need."""
    unwritten = sum(math.prod(file_shape(manifest["dtype"], shape)) for shape in manifest["shapes"].values())
    unwritten = unwritten * np.dtype(DTYPES[manifest["dtype"]][0]).itemsize * len(layers) - sum(
        f.stat().st_size for split in SPLITS for k in layers if (f := layer_file(path, split, k)).is_file()
    )
    require_free_space(path, max(unwritten, 0), f"the activation store of layers {layers}")


def _build_pending(
    path: Path, manifest: dict[str, Any], backbone: Backbone, task: Task, num_workers: int | None,
    commit_seconds: float, world: World,
) -> None:
    """Write the manifest's pending layers for every split (resuming committed rows), then record them.

    Rank 0 checks the space, creates the files and plans the batches still to write (those no progress file
    covers); each rank writes its contiguous share of them, and after a barrier rank 0 records the layers."""
    layers = manifest["pending"]["layers"]
    plan = world.broadcast(_plan_build(path, manifest, task) if world.is_main else None)
    mine = {split: [np.arange(a, b) for a, b in world.shard(np.asarray(spans, dtype=np.int64).reshape(-1, 2))]
            for split, spans in plan.items()}
    rows = sum(len(batch) for batches in mine.values() for batch in batches)
    with progress(total=rows, unit="img", desc=f"cache {task.name}") as bar:
        for split, batches in mine.items():
            if batches:
                _build_split(path, backbone, task, split, layers, manifest["dtype"], batches, num_workers,
                             commit_seconds, bar)
    world.barrier()
    if world.is_main:
        for split in SPLITS:
            for file in [path / split / "labels.npy", *(layer_file(path, split, k) for k in layers)]:
                manifest["checksums"][f"{split}/{file.name}"] = file_sha256(file)
        manifest["layers"] = sorted(set(manifest["layers"]) | set(layers))
        manifest["pending"] = None
        manifest["complete"] = True
        write_manifest(path, manifest)
        for split in SPLITS:
            for file in _progress_files(path, split):
                file.unlink()
        logger.info("activation store complete: %s (layers %s)", path, manifest["layers"])


def _plan_build(path: Path, manifest: dict[str, Any], task: Task) -> dict[str, list[tuple[int, int]]]:
    """Per split, the ``(start, stop)`` row spans of the batches still to write (on the grid of the build's
    batch size, so every batch is the one an uninterrupted single-process build runs); creates the split's
    labels and, for a split not started, its preallocated layer files."""
    layers, batch_size = manifest["pending"]["layers"], int(manifest["pending"]["batch_size"])
    shape = manifest["shapes"]
    plan = {}
    for split in SPLITS:
        data = task.splits[split]
        directory = path / split
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "labels.npy").is_file():
            atomic_write(directory / "labels.npy", lambda tmp, labels=data.labels: _save_npy(tmp, labels))
        done = _rows_written(path, split, layers)
        if not done:
            for k in layers:
                _create_layer(layer_file(path, split, k), file_shape(manifest["dtype"], shape[split]),
                              DTYPES[manifest["dtype"]][0])
        plan[split] = [(int(b[0]), int(b[-1]) + 1) for b in sequential_batches(0, len(data), batch_size)
                       if not any(a <= b[0] and b[-1] < z for a, z in done)]
    return plan


# ----------------------------------------------------------------------------------------------------
# The manifest and the cheap checks done on every open.
# ----------------------------------------------------------------------------------------------------

_SCHEMA = {"version": int, "backbone": dict, "task": dict, "layers": list, "dtype": str, "shapes": dict,
           "complete": bool, "checksums": dict, "manifest_sha256": str}


def _manifest_digest(manifest: dict[str, Any]) -> str:
    return digest({k: v for k, v in manifest.items() if k != "manifest_sha256"}, length=64)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically with its own SHA-256, so a hand edit or a damaged file is detected."""
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    atomic_write_json(path / MANIFEST, manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    """A store's manifest, refused with one line (naming the file and the fix) unless it is intact."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise InCAError(f"{path} is not an activation store (no {MANIFEST}); build one with inca-cache")
    try:
        manifest = read_json(file)
    except (OSError, ValueError) as exc:
        raise InCAError(f"{file} is unreadable ({first_line(exc)}): {REBUILD_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != CACHE_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise InCAError(f"{file} is store version {version}, this inca reads version {CACHE_VERSION}: {REBUILD_HINT}")
    wrong = [key for key, kind in _SCHEMA.items() if not isinstance(manifest.get(key), kind)]
    if wrong or "pending" not in manifest:
        raise InCAError(f"{file} lacks or garbles {', '.join(wrong) or 'pending'}: {REBUILD_HINT}")
    if manifest["manifest_sha256"] != _manifest_digest(manifest):
        raise InCAError(f"{file} was edited or damaged (its content no longer matches its checksum): {REBUILD_HINT}")
    return manifest


def check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file of a complete store is there, with the ``.npy`` header and size the manifest implies (and an
    8-bit store's rows are of the scheme this inca reads)."""
    _check_scheme(path, manifest)
    np_dtype = np.dtype(DTYPES[manifest["dtype"]][0])
    try:
        shapes = {split: file_shape(manifest["dtype"], manifest["shapes"][split]) for split in SPLITS}
    except (KeyError, TypeError, ValueError):
        raise InCAError(f"{path / MANIFEST} has no valid shapes for {'/'.join(SPLITS)}: {REBUILD_HINT}") from None
    for split, shape in shapes.items():
        expected = [(path / split / "labels.npy", shape[:1], None)]
        expected += [(layer_file(path, split, k), shape, np_dtype) for k in manifest["layers"]]
        for file, want_shape, want_dtype in expected:
            problem = _npy_problem(file, want_shape, want_dtype)
            if problem:
                raise InCAError(f"{file} {problem}: {REBUILD_HINT}")


def _npy_problem(file: Path, shape: tuple[int, ...], dtype: np.dtype | None) -> str | None:
    """What is wrong with an ``.npy`` file given its expected shape (and dtype), from its header and size."""
    if file.is_symlink() or not file.is_file():
        return "is missing" if not file.is_symlink() else "is a symlink, not a store file"
    try:
        with open(file, "rb") as f:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            header = read_header[np.lib.format.read_magic(f)](f)  # (shape, fortran_order, dtype)
            offset = f.tell()
    except (OSError, ValueError, KeyError) as exc:
        return f"has no valid .npy header ({first_line(exc)})"
    got_shape, _, got_dtype = header
    if tuple(got_shape) != shape or (dtype is not None and got_dtype != dtype):
        return f"holds {tuple(got_shape)} {got_dtype}, the manifest says {shape} {dtype or ''}".rstrip()
    size = offset + int(np.prod(shape)) * got_dtype.itemsize
    if file.stat().st_size != size:
        return f"is {file.stat().st_size} bytes, {size} expected (truncated or padded)"
    return None


def _check_scheme(path: Path, manifest: dict[str, Any]) -> None:
    """A store's dtype is one this inca reads, and an 8-bit store's packed rows are of :data:`INT8_SCHEME`."""
    if manifest["dtype"] not in DTYPES:
        raise InCAError(f"{path} stores {manifest['dtype']!r} activations, which this inca does not read "
                        f"({', '.join(DTYPES)}): {REBUILD_HINT}")
    scheme = manifest.get("quantization")
    if manifest["dtype"] == "int8" and scheme != INT8_SCHEME:
        stored = scheme.get("name") if isinstance(scheme, dict) else scheme
        raise InCAError(f"{path} holds 8-bit activations of scheme {stored!r}, not {INT8_SCHEME['name']!r} as "
                        f"this inca reads them: {REBUILD_HINT}")


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


def _progress_files(path: Path, split: str) -> list[Path]:
    return sorted((path / split).glob("progress*.json"))


def _rows_written(path: Path, split: str, layers: list[int]) -> list[tuple[int, int]]:
    """The row spans of ``split`` committed for the build of ``layers``: one per writer (a rank's shard, from
    its first row to its last committed one); progress of another build's layers does not count."""
    spans = []
    for file in _progress_files(path, split):
        state = read_json(file)
        if state.get("layers") == layers:
            spans.append((int(state.get("start", 0)), int(state["rows"])))
    return spans


def _build_split(
    path: Path,
    backbone: Backbone,
    task: Task,
    split: str,
    layers: list[int],
    dtype: str,
    batches: list[np.ndarray],
    num_workers: int | None,
    commit_seconds: float,
    bar: Any,
) -> None:
    """Write ``batches`` (consecutive row ranges, in order) of ``split`` into its preallocated layer files,
    committing progress every ``commit_seconds``."""
    data = task.splits[split]
    np_dtype, torch_dtype = DTYPES[dtype]
    shape = file_shape(dtype, (len(data), backbone.num_tokens, backbone.width))
    arrays = {k: _open_layer(layer_file(path, split, k), shape, np_dtype) for k in layers}
    progress_file = path / split / f"progress-{int(batches[0][0])}.json"
    last_commit = time.monotonic()
    pin = backbone.device.type == "cuda"
    loader = image_loader(data, backbone.transform, batches, num_workers, pin_memory=pin)
    for batch, (images, _) in zip(batches, loader):
        tokens = backbone.extract(images, layers)
        rows = slice(int(batch[0]), int(batch[-1]) + 1)
        for layer, value in tokens.items():
            where = f"layer {layer} of {task.spec}, rows {rows.start}.."
            arrays[layer][rows] = _stored(value, dtype, torch_dtype, where)
        bar.update(images.shape[0])
        if batch is batches[-1] or time.monotonic() - last_commit >= commit_seconds:
            _commit(arrays, progress_file, int(batches[0][0]), rows.stop, layers)
            last_commit = time.monotonic()


def _stored(value: torch.Tensor, dtype: str, torch_dtype: torch.dtype, where: str) -> np.ndarray:
    """A batch of one layer's activations as the store holds them (packed 8-bit rows quantised where the
    backbone ran: exact operations only, so every device writes the same bytes)."""
    if dtype == "int8":
        try:
            return quantize(value).raw.cpu().numpy()
        except InCAError as exc:
            raise InCAError(f"{where}: {exc}") from None
    value = value.to("cpu", torch_dtype)
    if not torch.isfinite(value).all():
        raise InCAError(f"{where}: activations overflow {dtype}: rebuild with --dtype bfloat16")
    return value.view(torch.uint16).numpy() if dtype == "bfloat16" else value.numpy()


def _create_layer(file: Path, shape: tuple[int, ...], dtype: Any) -> None:
    """A new layer file (replacing any), its blocks claimed now: no SIGBUS when the disk fills later."""
    if file.exists() or file.is_symlink():
        file.unlink()
    os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
    open_memmap(file, mode="w+", dtype=dtype, shape=shape)  # writes the .npy header and sizes the file
    fd = os.open(file, os.O_RDWR | os.O_NOFOLLOW)
    try:
        os.posix_fallocate(fd, 0, file.stat().st_size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            size = file.stat().st_size
            file.unlink()
            raise InCAError(f"no space for {file.name} ({size} bytes) at {file.parent}: free some space or use "
                            "another --cache-dir") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def _open_layer(file: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    """A layer file :func:`_create_layer` made (this run or an interrupted one), as a writable memmap."""
    problem = _npy_problem(file, shape, np.dtype(dtype))
    if problem:
        raise InCAError(f"{file} {problem} in an unfinished build: rebuild with inca-cache --rebuild")
    return open_memmap(file, mode="r+")


def _commit(arrays: dict[int, np.memmap], progress_file: Path, start: int, rows: int, layers: list[int]) -> None:
    """Make written rows durable first, then advance the progress marker that resume trusts."""
    for array in arrays.values():
        array.flush()
    atomic_write_json(progress_file, {"start": start, "rows": rows, "layers": layers})


def _save_npy(tmp: str, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, array)


def verify_cache(path: str | os.PathLike) -> dict[str, Any]:
    """Re-check a finished store: the cheap checks of every open, labels in range, and every file's checksum."""
    cache = ActivationCache(path)
    manifest = cache.manifest
    problems: list[str] = []
    num_classes = len(cache.classes)
    for split in SPLITS:
        shape = tuple(manifest["shapes"][split])
        labels = cache.labels(split)
        if labels.shape != shape[:1] or labels.min() < 0 or labels.max() >= num_classes:
            problems.append(f"{split}/labels.npy does not match {shape[0]} rows of {num_classes} classes")
        for layer in cache.layers:
            array = cache.layer(split, layer)
            if array.shape != file_shape(cache.dtype, shape):
                problems.append(f"{split}/layer_{layer}.npy has shape {array.shape}, manifest says {shape}")
    files = sorted(manifest["checksums"])
    for name in progress(files, desc="verify", unit="file"):
        file = cache.path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(file) != manifest["checksums"][name]:
            problems.append(f"{name} does not match its checksum")
    if problems:
        raise InCAError(f"{cache.path} failed verification: {'; '.join(problems[:4])}; {REBUILD_HINT}")
    return {
        "path": str(cache.path),
        "backbone": manifest["backbone"]["name"],
        "task": manifest["task"]["spec"],
        "layers": cache.layers,
        "dtype": cache.dtype,
        "scheme": manifest.get("quantization", {}).get("name"),
        "rows": {split: manifest["shapes"][split][0] for split in SPLITS},
        "files": len(files),
    }
