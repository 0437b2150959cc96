"""Training curves as they happen: per-epoch scalars of every adapter and method in a TensorBoard log directory
(``--log-dir``), the ecosystem's usual viewer (``tensorboard --logdir DIR``).

One :class:`TrainingLog` is made per command and handed down: a suite scopes it to a task (and a comparison to a
method), a trainer writes each epoch of each run it trains. A run is a subdirectory (``<task>/<adapter>`` for
``inca-train``, ``<task>/<method>[/<grid point>]`` for ``inca-compare``), so TensorBoard overlays the runs of a
task on one chart per tag: ``train/loss`` (the epoch's mean training loss), ``val/accuracy`` and ``lr`` (the
schedule's learning rate at the end of the epoch), the epoch (1-based) as the step.

A resumed or rerun training writes an epoch that an interrupted process may have written already: each run's first
epoch in a process is its writer's ``purge_step``, so TensorBoard hides whatever an earlier process wrote for that
epoch and after, and no epoch shows twice. Only the rank that owns a unit's results writes its runs (rank 0 of a
data-parallel unit).

TensorBoard is an optional dependency (``pip install inca[tensorboard]``); nothing here imports torch until a run
is written.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from inca.errors import InCAError
from inca.io import check_directory

__all__ = ["TrainingLog", "adapter_names", "require_tensorboard", "run_name", "scope"]

INSTALL = "pip install inca[tensorboard]"

# The short names of an adapter's spec fields in its run name and plot legend (inca.adapters.inca.AdapterSpec).
_SHORT = {"layer": "layer", "lr": "lr", "weight_decay": "wd", "num_queries": "q", "num_heads": "heads",
          "mlp_ratio": "mlp", "seed": "seed"}


def require_tensorboard() -> None:
    """Refuse ``--log-dir`` in one line, before any work, when the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise InCAError(f"--log-dir writes TensorBoard logs and the tensorboard package is not installed: {INSTALL}")


def run_name(values: Mapping[str, Any]) -> str:
    """A run's directory name from the values that set it apart (``{"lr": 0.001, "rank": 8}`` -> ``lr0.001-rank8``),
    each key shortened as in :func:`adapter_names`; characters a path should not hold become ``_``."""
    text = "-".join(f"{_SHORT.get(k, k)}{v:g}" if isinstance(v, float) else f"{_SHORT.get(k, k)}{v}"
                    for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text) or "run"


def adapter_names(specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A readable, unique name for each adapter of a bank (its spec's fields, as ``results.json`` records them): its
    layer and whatever else varies across the bank (``layer5-lr0.001-q4``); the index in front only when two specs
    are alike."""
    varying = [key for key in _SHORT if key == "layer" or len({spec[key] for spec in specs}) > 1]
    names = [run_name({key: spec[key] for key in varying}) for spec in specs]
    if len(set(names)) < len(names):
        names = [f"{i}-{name}" for i, name in enumerate(names)]
    return names


class TrainingLog:
    """A TensorBoard log directory that trainers write per-epoch scalars to, one run per subdirectory.

    :meth:`scoped` returns a view of the same log under a subdirectory (a task, a method): views share the open
    writers, and :meth:`close` closes those under the view's directory (a suite closes each unit's)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        require_tensorboard()
        check_directory(log_dir, "--log-dir")
        self.directory = Path(log_dir)
        self._writers: dict[Path, Any] = {}  # shared by every view: run directory -> SummaryWriter

    def scoped(self, name: str) -> TrainingLog:
        """This log under subdirectory ``name``: what the runs of a task or a method are written below."""
        view = copy.copy(self)  # the same writers: a view, not a second log
        view.directory = self.directory / name
        return view

    def scalars(self, epoch: int, values: Mapping[str, float | None], run: str | None = None) -> None:
        """Record epoch ``epoch`` (1-based) of this log's run, or of its subdirectory ``run``: each finite value
        under its tag. The first epoch a run gets in this process hides what an earlier one wrote from it on."""
        from inca.distributed import current

        if not current().is_main:
            return
        path = self.directory / run if run else self.directory
        writer = self._writers.get(path)
        if writer is None:
            writer = self._writers[path] = self._open(path, epoch)
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                writer.add_scalar(tag, value, epoch)
        writer.flush()  # a watched run shows each epoch as it ends

    def close(self) -> None:
        """Close the writers of the runs under this log's directory (they reopen if written again)."""
        for path in [p for p in self._writers if p == self.directory or self.directory in p.parents]:
            self._writers.pop(path).close()

    @staticmethod
    def _open(path: Path, first_epoch: int) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # an installed tensorboard that torch cannot use
            raise InCAError(f"TensorBoard logging needs a tensorboard that torch can use ({exc}): {INSTALL}") from None
        return SummaryWriter(str(path), purge_step=first_epoch)


@contextlib.contextmanager
def scope(log: TrainingLog | None, name: str) -> Iterator[TrainingLog | None]:
    """``log`` scoped to ``name`` for one unit of work (None without a log); the unit's writers closed after it."""
    if log is None:
        yield None
        return
    view = log.scoped(name)
    try:
        yield view
    finally:
        view.close()
