"""torch.distributed under ``torchrun``: which process this is, and the few collective steps inca takes.

A plain process is a :class:`World` of one, where every collective is a no-op and every shard is the whole,
so the single-process code paths are the distributed ones with ``size == 1`` (and give bit-identical
results). Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) :func:`launch` joins the process group once:
gloo for CPU tensors, plus NCCL for CUDA tensors when GPUs are present (one per local rank).

Two ways to use many processes, chosen per suite (:func:`inca.suite.run_suite`):

* **work sharing**: independent units (a task's bank, a (task, method) pair) are claimed one at a time from
  an atomic counter in the c10d store (``Store.add``), so a slow unit never idles the other ranks; each unit
  runs in a world of one (:data:`SOLO`).
* **data parallel**: with fewer units than ranks, every rank runs each unit on a disjoint shard of each
  global batch (``per-rank batch x world size``); the loss of each shard is weighted by its share of the
  global batch and the gradients are summed across ranks (:meth:`World.all_reduce_gradients`), which is the
  gradient of the global batch.

The code a unit runs asks :func:`current` which world it is in. Barriers and rank 0's broadcasts go through
the c10d store, polled, so a rank may wait for another's long unit (or rank 0's checksums) for hours without
meeting the process group's timeout; tensor sums, made in lockstep inside training loops, use the group.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["SOLO", "World", "acting_as", "current", "launch", "launched"]


T = TypeVar("T")
Batch = TypeVar("Batch")


@dataclass(eq=False)
class World:
    """The processes that run one piece of work together: this one's ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: Any = None  # the c10d store (a torch.distributed.Store) of a launched world
    cpu_group: Any = None  # for CPU tensors and objects in a caller's process group (None: the default group)
    _keys: int = field(default=0, repr=False)  # every rank makes the same calls in order, so the keys agree

    @property
    def is_main(self) -> bool:
        """The rank that writes shared files (reports, manifests, adapters) and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def _key(self, kind: str) -> str:
        self._keys += 1
        return f"inca/{kind}/{self._keys}"

    def barrier(self) -> None:
        """Wait for every rank. Through the store, polled, so that waiting for another rank's long unit or a
        store's checksums never runs into the process group's timeout."""
        if not self.is_distributed:
            return
        if self.store is None:
            dist.barrier(group=self.cpu_group)
            return
        key = self._key("barrier")
        self.store.add(key, 1)
        while self.store.add(key, 0) < self.size:
            time.sleep(POLL_SECONDS)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (a picklable object; polled through the store, as :meth:`barrier`)."""
        if not self.is_distributed:
            return value
        if self.store is None:
            box = [value]
            dist.broadcast_object_list(box, src=0, group=self.cpu_group)
            return box[0]
        key = self._key("broadcast")
        if self.is_main:
            self.store.set(key, pickle.dumps(value))
            return value
        while not self.store.check([key]):
            time.sleep(POLL_SECONDS)
        return pickle.loads(self.store.get(key))

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (a picklable object), by rank, on every rank (polled through the store, as
        :meth:`barrier`)."""
        if not self.is_distributed:
            return [value]
        if self.store is None:
            values: list[Any] = [None] * self.size
            dist.all_gather_object(values, value, group=self.cpu_group)
            return values
        key = self._key("gather")
        self.store.set(f"{key}/{self.rank}", pickle.dumps(value))
        keys = [f"{key}/{rank}" for rank in range(self.size)]
        while not self.store.check(keys):
            time.sleep(POLL_SECONDS)
        values = [pickle.loads(self.store.get(k)) for k in keys]
        self.store.add(f"{key}/read", 1)
        if self.is_main:  # the store may live in this process: leave it last, in case every rank stops on the values
            while self.store.add(f"{key}/read", 0) < self.size:
                time.sleep(POLL_SECONDS)
        return values

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.is_distributed:
            dist.all_reduce(tensor, group=None if tensor.is_cuda else self.cpu_group)
        return tensor

    def broadcast_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Rank 0's values of ``params`` on every rank, as ``DistributedDataParallel`` does at the start: replicas
        that start bit-identical stay so, whatever small differences their set-up had (SVDs, BLAS kernels)."""
        if not self.is_distributed:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0, group=None if p.is_cuda else self.cpu_group)

    def all_reduce_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over the ranks (one flat buffer, one collective); a parameter that
        got no gradient on this rank contributes zeros. With shard losses weighted by their share of the global
        batch, the sum is the global batch's gradient."""
        if not self.is_distributed:
            return
        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_(flat)
        offset = 0
        for p, g in zip(params, grads):
            summed = flat[offset : offset + g.numel()].view_as(g)
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
            offset += g.numel()

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of ``indices`` (parts differ in length by at most one)."""
        return np.array_split(np.asarray(indices), self.size)[self.rank] if self.is_distributed else indices

    def shard_batches(self, num_rows: int, batch_size: int) -> list[np.ndarray]:
        """This rank's contiguous part of rows ``0..num_rows-1``, cut into batches (evaluation: each rank counts
        its part and the counts are summed)."""
        rows = self.shard(np.arange(num_rows))
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]

    def sharded(
        self, batches: Sequence[np.ndarray], loader: Callable[[list[np.ndarray]], Iterable[Batch]]
    ) -> Iterator[tuple[Batch | None, float]]:
        """For each global batch in order: this rank's part, loaded (None when the part is empty), and its share
        of the global batch (the weight of its mean loss). ``loader`` maps index arrays to loaded batches."""
        parts = [self.shard(batch) for batch in batches]
        loaded = iter(loader([part for part in parts if len(part)]))
        for batch, part in zip(batches, parts):
            yield (next(loaded) if len(part) else None), len(part) / len(batch)

    def claimed(self, count: int) -> Iterator[int]:
        """Indices ``0..count-1``, each handed to exactly one rank, in the order ranks ask for them."""
        if self.store is None:  # one process, or a process group set up by the caller: a fixed stripe each
            yield from range(self.rank, count, self.size)
            return
        key = self._key("claims")
        while (index := self.store.add(key, 1) - 1) < count:
            yield index

    def describe(self) -> str:
        return f"rank {self.rank}/{self.size}"


# How often a rank waiting on the store looks again: inca's own choice, 20 reads a second cost the store nothing
# and add at most 50 ms to a wait.
POLL_SECONDS = 0.05
# How long a collective of the process group waits for the slowest rank: inca's own choice, twice torch's default
# (30 minutes, torch.distributed.constants.default_pg_timeout). Tensor sums inside training loops wait for every
# rank's step, which a first pass over cold image files can stretch; waits between units go through the store
# (polled, never timed out).
PROCESS_GROUP_TIMEOUT_MINUTES = 60.0
SOLO = World()
_launched = SOLO
_current: contextvars.ContextVar[World] = contextvars.ContextVar("inca_world", default=SOLO)


def launch(timeout_minutes: float = PROCESS_GROUP_TIMEOUT_MINUTES) -> World:
    """Join the process group ``torchrun`` set up (once per process), or a world of one when not launched.

    A process group the caller initialised already is used as it is (units are then striped over the ranks
    instead of claimed, since inca does not hold its store)."""
    global _launched
    if _launched.is_distributed:
        return _launched
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():  # the caller's own process group, with gloo beside it
        cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        _launched = World(dist.get_rank(), dist.get_world_size(), local_rank, cpu_group=cpu_group)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        store, rank, size = next(dist.rendezvous("env://"))
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                                timeout=timedelta(minutes=timeout_minutes))
        _launched = World(rank, size, local_rank, store)
    _current.set(_launched)
    return _launched


def launched() -> World:
    """Every process this command was launched with (a world of one without ``torchrun``)."""
    return _launched


def current() -> World:
    """The world the running piece of work shares: :func:`launched` for data-parallel work, else one process."""
    return _current.get()


@contextlib.contextmanager
def acting_as(world: World) -> Iterator[World]:
    """Run the block as a member of ``world`` (e.g. :data:`SOLO` for a unit this rank claimed alone)."""
    token = _current.set(world)
    try:
        yield world
    finally:
        _current.reset(token)
