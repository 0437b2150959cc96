"""Where a task's activations come from, and where a store is held: decided by measurement on this machine.

**Cache or stream.** A store pays for itself when building it once and reading it every epoch costs less than
running the backbone every epoch. On a CPU the backbone is slow and the store wins by far; on a fast GPU a big
backbone can compute activations faster than a disk can give them back. So ``--cache auto``, when no store holds
the layers yet, measures three rates where the work will run, at the batch size training uses:

* the backbone's images per second (images loaded and preprocessed as the training would, through the deepest
  layer read; one batch warms up, the next is timed),
* the store's read rate where it would live: a timed read of a probe file next to it, from the page cache when
  the store fits in free memory (as it then stays there after the build), cold from the disk otherwise (pages
  dropped with ``posix_fadvise``), or a copy in memory when the store would be held there (``--cache-device``),
  and the write rate the build would see,
* the adapters' own step: the bank's forward, backward and AdamW update, and its forward alone, on the timed
  batch's tokens,

and predicts both runs (:class:`Workload`: every epoch trains on the train split and validates on val; val and
test are read once more at the end). A store's epoch is the larger of reading the rows and the adapters' work on
them, as :class:`~inca.activations.CachedSource` reads the next batch while the adapters work on the current one;
a live epoch is the backbone's time plus the adapters'. :func:`decide` picks the cheaper total; the decision and
its numbers are logged and kept in ``results.json``. The size and free-disk guards of ``--cache auto`` come first.

**Where a store is held.** ``--cache-device`` (:func:`cache_device`): ``disk`` reads the memmaps every epoch (the
page cache serves them when they fit); ``cpu`` and ``cuda`` load the layers a bank reads once, into (pinned) host
memory or GPU memory, and serve every epoch from there; ``auto`` picks ``cuda`` when training on a GPU whose free
memory holds them within ``--cache-memory-fraction``, else ``cpu`` when free RAM does, else ``disk``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .adapters.inca import AdapterSpec, InCABank
from .backbone import Backbone
from .devices import autocast
from .errors import InCAError
from .io import DEFAULT_MEMORY_FRACTION, existing_parent
from .options import CACHE_DEVICES
from .quantize import quantize
from .tasks import Task, image_loader
from .train.optim import BatchedAdamW

__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "CacheDecision",
    "Rates",
    "Workload",
    "cache_device",
    "decide",
    "free_memory",
    "measure_rates",
]

logger = logging.getLogger(__name__)

# Bytes of the probe file timed for the store's read and write rates: inca's own choice, large enough that the
# file system's per-call costs are a small part of it, small enough to take well under a second on an SSD.
PROBE_BYTES = 64 << 20
# Adapter steps timed after a warm-up one, the fastest kept: inca's own choice, steps cost a fraction of a backbone
# batch, and the fastest of a few is what a shared machine's other jobs disturb least.
ADAPTER_STEPS = 3


@dataclass(frozen=True)
class Rates:
    """What this machine does per second: the inputs of :func:`decide`."""

    backbone_images: float  # images through loading, preprocessing and the backbone
    store_read_bytes: float  # store bytes read where the store lives (see ``read_from``)
    store_write_bytes: float  # store bytes written by a build
    adapter_train_rows: float  # rows through the bank's forward and backward
    adapter_eval_rows: float  # rows through the bank's forward alone
    read_from: str = "disk"  # where the read rate was measured: disk, page cache, cpu memory, cuda memory


@dataclass(frozen=True)
class Workload:
    """The passes over the data one training makes: each epoch trains on train and validates on val, then val
    (selection) and test are read once more; a store of ``row_bytes`` bytes per row holds every split."""

    rows: dict[str, int]
    epochs: int
    row_bytes: int

    def epoch_rows(self) -> tuple[int, int]:
        """Rows trained and rows evaluated per epoch."""
        return self.rows["train"], self.rows["val"]

    def final_rows(self) -> int:
        return self.rows["val"] + self.rows["test"]


@dataclass(frozen=True)
class CacheDecision:
    """``build`` a store or ``stream`` the live backbone, with the predicted seconds of each and the rates."""

    choice: str
    build_seconds: float
    store_epoch_seconds: float
    stream_epoch_seconds: float
    store_seconds: float  # build + every epoch from the store + the final passes
    stream_seconds: float  # every epoch live + the final passes
    rates: Rates

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rates": asdict(self.rates)}

    def message(self) -> str:
        r = self.rates
        return (f"predicted {self.store_seconds:.1f} s with a store (build {self.build_seconds:.1f} s, then "
                f"{self.store_epoch_seconds:.2f} s an epoch) vs {self.stream_seconds:.1f} s streaming "
                f"({self.stream_epoch_seconds:.2f} s an epoch); measured: backbone {r.backbone_images:.0f} images/s, "
                f"store read {r.store_read_bytes / 1e9:.2f} GB/s ({r.read_from}), write "
                f"{r.store_write_bytes / 1e9:.2f} GB/s, adapters {r.adapter_train_rows:.0f} rows/s training, "
                f"{r.adapter_eval_rows:.0f} rows/s evaluating")


def decide(rates: Rates, work: Workload) -> CacheDecision:
    """The cheaper of building a store then reading it every epoch, and streaming every epoch (ties: build)."""
    train, evaluated = work.epoch_rows()
    adapters = train / rates.adapter_train_rows + evaluated / rates.adapter_eval_rows
    final_adapters = work.final_rows() / rates.adapter_eval_rows
    read = (train + evaluated) * work.row_bytes / rates.store_read_bytes
    store_epoch = max(read, adapters)  # the next batch is read while the adapters work on this one
    stream_epoch = (train + evaluated) / rates.backbone_images + adapters
    total_rows = sum(work.rows.values())
    build = total_rows / rates.backbone_images + total_rows * work.row_bytes / rates.store_write_bytes
    store = build + work.epochs * store_epoch + max(work.final_rows() * work.row_bytes / rates.store_read_bytes,
                                                    final_adapters)
    stream = work.epochs * stream_epoch + work.final_rows() / rates.backbone_images + final_adapters
    return CacheDecision("build" if store <= stream else "stream", build, store_epoch, stream_epoch, store, stream,
                         rates)


def measure_rates(
    backbone: Backbone, task: Task, layers: list[int], adapters: Sequence[AdapterSpec], batch_size: int,
    store_dir: str | os.PathLike, store_bytes: int, dtype: str, held_on: str, num_workers: int | None = None,
) -> Rates:  # fmt: skip
    """Time the backbone and the adapters on the first train batches (one to warm up, one timed; the adapters
    read the tokens as a ``dtype`` store gives them) and the store's read and write rates at ``store_dir`` for a
    store of ``store_bytes`` held on ``held_on`` (disk, cpu, cuda)."""
    images, features = _time_backbone(backbone, task, layers, batch_size, num_workers)
    stored = {layer: quantize(t) if dtype == "int8" else t.to(getattr(torch, dtype)) for layer, t in features.items()}
    train_rows, eval_rows = _time_adapters(adapters, stored, backbone.width, task.num_classes, backbone.device)
    read, write, read_from = _time_store(store_dir, store_bytes, held_on)
    return Rates(images, read, write, train_rows, eval_rows, read_from)


def _time_backbone(
    backbone: Backbone, task: Task, layers: list[int], batch_size: int, num_workers: int | None
) -> tuple[float, dict[int, torch.Tensor]]:
    """Images per second through loading and the backbone (the second batch; the first warms up), and the
    timed batch's tokens."""
    split = task.splits["train"]
    n = min(len(split), 2 * batch_size)
    batches = [b for b in (np.arange(0, min(batch_size, n)), np.arange(batch_size, n)) if len(b)]
    loader = image_loader(split, backbone.transform, batches, num_workers)
    seconds, rows, features = 0.0, 0, {}
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        images, _ = next(loader)
        features = backbone.extract(images, layers)
        _synchronize(backbone.device)
        if i == len(batches) - 1:  # the last batch: the warmed-up one when there are two
            seconds, rows = time.perf_counter() - start, len(batch)
    return rows / max(seconds, 1e-9), features


def _time_adapters(
    specs: Sequence[AdapterSpec], features: dict[int, Any], width: int, num_classes: int, device: torch.device,
) -> tuple[float, float]:  # fmt: skip
    """Rows per second of a training step of the bank (forward, backward, AdamW) and of its forward alone, on
    ``features``."""
    bank = InCABank(list(specs), width, num_classes).to(device)
    optimizer = BatchedAdamW(bank.optimizer_groups())
    rows = features[bank.layers[0]].shape[0]
    labels = torch.arange(rows, device=device) % num_classes

    def train_step() -> None:
        with autocast(device):
            logits = bank(features)
        F.cross_entropy(logits.float().flatten(0, 1), labels.repeat(len(bank))).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def eval_step() -> None:
        with torch.inference_mode(), autocast(device):
            bank(features)

    rates = []
    for step in (train_step, eval_step):
        step()  # warm-up
        seconds = []
        for _ in range(ADAPTER_STEPS):
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
        rates.append(rows / max(min(seconds), 1e-9))
    return rates[0], rates[1]


def _time_store(directory: str | os.PathLike, store_bytes: int, held_on: str) -> tuple[float, float, str]:
    """Read and write rates of a probe file at ``directory``, and where the read was measured. A store held in
    memory is read at the rate of a copy there; one that fits in free memory stays in the page cache after its
    build; a larger one is read cold from the disk."""
    size = int(min(PROBE_BYTES, max(store_bytes, 1 << 20))) >> 20 << 20  # whole MiB: rows of 4 KiB below
    directory = existing_parent(directory)
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    fd, name = tempfile.mkstemp(prefix=".inca-read-probe-", dir=directory)
    path = Path(name)
    try:
        start = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            f.write(data.data)
            f.flush()
            os.fsync(f.fileno())
        write = size / max(time.perf_counter() - start, 1e-9)
        if held_on != "disk":  # cpu, or a CUDA device
            return _copy_rate(data, held_on), write, f"{held_on} memory"
        cold = store_bytes > free_memory("cpu") and hasattr(os, "posix_fadvise")
        if cold:
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buffer = bytearray(16 << 20)
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
        return size / max(time.perf_counter() - start, 1e-9), write, "disk" if cold else "page cache"
    finally:
        path.unlink(missing_ok=True)


def _copy_rate(data: np.ndarray, device: str) -> float:
    """Bytes per second of gathering rows from a tensor held on ``device`` (what a held store's epoch does)."""
    held = torch.from_numpy(data).view(-1, 4096).to(device)
    index = torch.arange(held.shape[0], device=held.device)
    held.index_select(0, index)  # warm-up
    _synchronize(held.device)
    start = time.perf_counter()
    held.index_select(0, index)
    _synchronize(held.device)
    return data.nbytes / max(time.perf_counter() - start, 1e-9)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(where: str | torch.device) -> int:
    """Bytes free for new data: the kernel's ``MemAvailable`` for host memory (page cache it can drop counts),
    ``torch.cuda.mem_get_info`` for a GPU."""
    device = torch.device(where)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_device(requested: str, nbytes: int, train_device: torch.device, fraction: float) -> str:
    """Where a store's ``nbytes`` of layers are served from: ``disk``, ``cpu`` or ``cuda`` (the GPU training
    runs on). ``auto``: the GPU when training runs there and ``fraction`` of its free memory holds them, else host
    memory when ``fraction`` of the free RAM does, else the disk. An explicit place that cannot hold them is one
    line."""
    if requested not in CACHE_DEVICES:
        raise InCAError(f"--cache-device {requested!r} is not one of {', '.join(CACHE_DEVICES)}")
    if not 0 < fraction <= 1:
        raise InCAError(f"--cache-memory-fraction must be in (0, 1], not {fraction}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise InCAError("--cache-device cuda needs a CUDA GPU and none is available: use auto, cpu or disk")
    if requested == "disk":
        return "disk"
    gpu = train_device if train_device.type == "cuda" else torch.device("cuda")
    places = {"auto": ["cuda", "cpu"] if train_device.type == "cuda" else ["cpu"], "cpu": ["cpu"], "cuda": ["cuda"]}
    for place in places[requested]:
        free = free_memory(gpu if place == "cuda" else "cpu")
        if nbytes <= fraction * free:
            return str(gpu) if place == "cuda" else "cpu"
        if requested != "auto":
            raise InCAError(f"--cache-device {requested}: the store's layers take {nbytes / 1e9:.2f} GB, more than "
                            f"{fraction:g} of the {free / 1e9:.2f} GB free there: use --cache-device disk or raise "
                            "--cache-memory-fraction")
    return "disk"
