"""One InCA run on one task: the adapter grid becomes one bank, trained on cached or live activations.

The grid (layers x learning rates x weight decays x queries x heads x MLP ratios x seeds) is one
:class:`~inca.adapters.inca.InCABank` per task. Every adapter is validated after each epoch and ends with
the weights of its best epoch (the end-to-end methods' model selection); the best adapter on the validation
split is saved with its metadata and reported with its test accuracy, next to every other adapter's figures.
Suites of tasks (``inca-train``) are :func:`inca.suite.run_train_suite`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..activations import CACHE_MODES, ActivationSource, CachedSource, open_source
from ..adapters.inca import AdapterSpec, InCABank
from ..adapters.saved import TaskAdapter, save_adapter
from ..backbone import Backbone
from ..distributed import current
from ..errors import InCAError
from ..io import refuse_symlink
from ..tasks import Task
from .bank import evaluate_bank, evaluate_ensemble, select_best, top_adapters, train_bank

_logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
ADAPTER_DIR = "adapter"
ENSEMBLE_DIR = "ensemble"


@dataclass
class InCAOptions:
    """Everything about an InCA run except the backbone, the task and the layers."""

    lr: list[float] = field(default_factory=lambda: [1e-3])
    weight_decay: list[float] = field(default_factory=lambda: [1e-4])
    queries: list[int] = field(default_factory=lambda: [1])
    heads: list[int] = field(default_factory=list)  # empty: the backbone's number of heads
    mlp_ratio: list[float] = field(default_factory=lambda: [0.0])
    adapter_seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 10
    batch_size: int = 64
    warmup_ratio: float = 0.1
    seed: int = 0
    cache: str = "auto"  # one of inca.activations.CACHE_MODES
    cache_dir: str | None = None
    cache_dtype: str = "float16"
    cache_max_gb: float = 64.0
    num_workers: int | None = None
    ensemble: int = 1  # also combine the top-K adapters by val (averaged probabilities) when K > 1
    verify_cache: bool = False  # re-hash an existing store's files before training on it
    augment: bool = False  # timm's training augmentation on the train split (live activations, never a store)

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise InCAError(f"--cache {self.cache!r} is not one of {', '.join(CACHE_MODES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InCAError(f"--epochs ({self.epochs}) and --batch-size ({self.batch_size}) must be positive")
        for name in ("lr", "weight_decay", "queries", "mlp_ratio", "adapter_seeds"):
            if not getattr(self, name):
                raise InCAError(f"--{name.replace('_', '-')} needs at least one value")
        if self.ensemble < 1:
            raise InCAError(f"--ensemble must be at least 1 (1: select one adapter), got {self.ensemble}")
        if any(lr <= 0 for lr in self.lr):
            raise InCAError(f"learning rates must be positive, got {self.lr}")

    def grid(self, layers: list[int], default_heads: int) -> list[AdapterSpec]:
        """One spec per combination, layer-major (the order of the results table)."""
        heads = self.heads or [default_heads]
        combos = itertools.product(
            layers, self.lr, self.weight_decay, self.queries, heads, self.mlp_ratio, self.adapter_seeds
        )
        return [
            AdapterSpec(layer=layer, num_heads=h, num_queries=q, mlp_ratio=float(m), lr=float(lr),
                        weight_decay=float(wd), seed=int(s))
            for layer, lr, wd, q, h, m, s in combos
        ]


# Options that say where activations come from or how fast, not what is trained: they may change between a run
# and its resumption, and a finished result is reused whatever they were.
SOURCE_OPTIONS = ("cache", "cache_dir", "num_workers", "verify_cache")


def run_identity(backbone: Backbone, task: Task, layers: list[int], options: InCAOptions) -> dict[str, Any]:
    """What a task's bank training depends on beyond the bank itself: the backbone's weights, the task's data,
    the layers and every training option. Only a checkpoint made with all of it the same is resumed."""
    kept = {k: v for k, v in asdict(options).items() if k not in SOURCE_OPTIONS}
    return {"backbone": backbone.fingerprint, "task": task.fingerprint, "layers": list(layers), "options": kept}


def train_inca_task(
    backbone: Backbone,
    task: Task,
    layers: list[int],
    options: InCAOptions,
    out_dir: str | os.PathLike,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train the grid's bank on ``task``, save the best adapter (by val) under ``out_dir/adapter``.

    Resumes from ``out_dir/checkpoint.safetensors`` after an interruption; returns the task's results.
    """
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else backbone.device
    start = time.perf_counter()
    specs = options.grid(layers, backbone.num_heads)
    source = open_source(
        backbone, task, layers, epochs=options.epochs, cache=options.cache, cache_dir=options.cache_dir,
        dtype=options.cache_dtype, max_gb=options.cache_max_gb, num_workers=options.num_workers,
        train_transform=backbone.train_transform if options.augment else None, verify=options.verify_cache,
    )
    require_memory_for_bank(specs, backbone.width, task.num_classes, device)
    bank = InCABank(specs, backbone.width, task.num_classes)
    _logger.info("%s: training %d adapters together on layers %s", task.spec, len(specs), layers)
    refuse_symlink(out_dir, "the task's output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT_FILE
    cached = isinstance(source, CachedSource)
    history = train_bank(
        bank, source, epochs=options.epochs, batch_size=options.batch_size, device=device, seed=options.seed,
        warmup_ratio=options.warmup_ratio, eval_split="val", checkpoint_path=checkpoint,
        checkpoint_identity=run_identity(backbone, task, layers, options),
    )
    best, val_acc = select_best(bank, source, "val")
    test_acc = evaluate_bank(bank, source, "test")
    provenance = {"backbone": backbone.describe(), "task": task.spec,
                  "training": {"epochs": options.epochs, "batch_size": options.batch_size, "seed": options.seed}}
    adapter = TaskAdapter.from_bank(bank, [best], task.classes, {
        **provenance, "val_accuracy": float(val_acc[best]), "test_accuracy": float(test_acc[best]),
    })
    world = current()  # data-parallel: every rank holds the same bank, rank 0 writes it
    if world.is_main:
        save_adapter(adapter, out_dir / ADAPTER_DIR)
    ensemble = _ensemble(bank, source, val_acc, options.ensemble, out_dir / ENSEMBLE_DIR, task, provenance)
    if world.is_main:
        checkpoint.unlink(missing_ok=True)  # the results and the adapter are written: nothing left to resume
    trainable = sum(p.numel() for p in adapter.parameters())
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    adapters = [
        {**asdict(s), "val_acc": _num(val_acc[i]), "test_acc": _num(test_acc[i]), "diverged": bool(bank.diverged[i]),
         "best_epoch": history.best_epoch[i], "final_train_loss": _num(history.train_loss[-1][i])}
        for i, s in enumerate(specs)
    ]
    steps = options.epochs * -(-source.num_rows("train") // (options.batch_size * world.size))
    return {
        "task": task.spec,
        "classes": task.classes,
        "sizes": task.sizes(),
        "layers": layers,
        "activations": "cache" if cached else "live",
        "cache_path": str(source.cache.path) if cached else None,
        "adapters": adapters,
        "best": {"index": best, **adapters[best], "adapter_dir": str(out_dir / ADAPTER_DIR)},
        "val_acc": adapters[best]["val_acc"],
        "test_acc": adapters[best]["test_acc"],
        "ensemble": ensemble,
        "trainable_params": trainable,
        "backbone_params": backbone_params,
        "trainable_percent": 100.0 * trainable / backbone_params,
        "steps": steps,
        "best_epoch": adapters[best]["best_epoch"],
        "loss_curve": [epoch[best] for epoch in history.train_loss],
        "seconds": time.perf_counter() - start,
    }


# Bytes training keeps per bank parameter: fp32 weights, gradient, AdamW's two moments and the best epoch's copy.
TRAINING_BYTES_PER_PARAMETER = 5 * 4


def require_memory_for_bank(specs: list[AdapterSpec], width: int, num_classes: int, device: torch.device) -> None:
    """Refuse in one line, before allocating anything, a grid whose bank cannot fit in ``device``'s memory at all
    (say ``--queries 1000000000``): its parameters are counted on the meta device, which allocates nothing."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in InCABank(specs, width, num_classes).parameters())
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > total:
        raise InCAError(
            f"the bank of {len(specs)} adapter(s) has {parameters:,} parameters, {needed / 2**30:,.1f} GiB to train, "
            f"more than the {total / 2**30:,.1f} GiB of memory {device} has: lower --queries, --mlp-ratio or the "
            "grid's size"
        )


def _ensemble(
    bank: InCABank, source: ActivationSource, val_acc: torch.Tensor, k: int, directory: Path, task: Task,
    provenance: dict[str, Any],
) -> dict[str, Any] | None:
    """The top-``k`` adapters by val averaged (the InCA paper's parallel ensembling), saved and scored."""
    if k < 2:
        return None
    members = top_adapters(val_acc, k)
    if len(members) < k:
        _logger.warning("%s: only %d adapters did not diverge; the ensemble has %d members", task.spec,
                        len(members), len(members))
    val, test = (evaluate_ensemble(bank, source, members, split) for split in ("val", "test"))
    ensemble = TaskAdapter.from_bank(bank, members, task.classes,
                                     {**provenance, "val_accuracy": val, "test_accuracy": test})
    if current().is_main:
        save_adapter(ensemble, directory)
    _logger.info("%s: ensemble of the top %d adapters: val %.4f, test %.4f", task.spec, len(members), val, test)
    params = sum(p.numel() for p in ensemble.parameters())
    return {"k": len(members), "members": members, "val_acc": val, "test_acc": test, "trainable_params": params,
            "adapter_dir": str(directory)}


def _num(value: Any) -> float | None:
    """A JSON-safe float: NaN (diverged) becomes null."""
    value = float(value)
    return None if value != value else value
