"""One InCA run on one task: the adapter grid becomes one bank, trained on cached or live activations.

The grid (layers x learning rates x weight decays x queries x heads x MLP ratios x seeds) is one
:class:`~inca.adapters.inca.InCABank` per task, trained for every epoch (``search="grid"``) or by successive
halving (``search="halving"``: at each rung only the best adapters on the validation split go on). Every adapter
is validated after each epoch it trains and ends with the weights of its best epoch (the end-to-end methods' model
selection); the best adapter on the validation split, pruned ones included, is saved with its metadata and
reported with its test accuracy, next to every other adapter's figures.
Suites of tasks (``inca-train``) are :func:`inca.training.run_train_suite`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..activations import ActivationSource, CachedSource, open_source
from ..adapters.common import backbone_parameter_count, trainable_percent
from ..adapters.inca import AdapterSpec, InCABank
from ..adapters.saved import TaskAdapter, save_adapter
from ..backbone import Backbone
from ..distributed import current
from ..errors import InCAError
from ..io import refuse_symlink
from ..outputs import ADAPTER_DIR, ENSEMBLE_DIR
from ..tasks import Task
from ..training_log import TrainingLog
from .bank import evaluate_bank, evaluate_ensemble, select_best, top_adapters, train_bank
from .config import InCATrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
CURVES = ("epoch_loss", "val_curve")  # each adapter's, one value per epoch it trained (null: diverged by then)


# Settings that say where activations come from or how fast, not what is trained: they may change between a
# run and its resumption, and a finished result is reused whatever they were.
SOURCE_OPTIONS = (
    "cache", "cache_dir", "cache_device", "cache_memory_fraction", "num_workers", "verify_cache",
)


def run_identity(backbone: Backbone, task: Task, layers: list[int], config: InCATrainConfig) -> dict[str, Any]:
    """What a task's bank training depends on beyond the bank itself: the backbone's weights, the task's data,
    the layers and every training setting. Only a checkpoint made with all of it the same is resumed."""
    kept = {k: v for k, v in asdict(config).items() if k not in SOURCE_OPTIONS}
    return {"backbone": backbone.fingerprint, "task": task.fingerprint, "layers": list(layers), "options": kept}


def train_inca_task(
    backbone: Backbone,
    task: Task,
    layers: list[int],
    config: InCATrainConfig,
    out_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    log: TrainingLog | None = None,
) -> dict[str, Any]:
    """Train the grid's bank on ``task``, save the best adapter (by val) under ``out_dir/adapter``; with ``log``,
    each adapter's epochs go to TensorBoard as they end.

    Resumes from ``out_dir/checkpoint.safetensors`` after an interruption; returns the task's results.
    """
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else backbone.device
    start = time.perf_counter()
    specs = config.grid(layers, backbone.num_heads)
    halving = config.halving()
    if halving is not None and len(specs) < 2:
        raise InCAError(f"--search halving chooses among adapters, and this grid has {len(specs)}: add layers, "
                        "learning rates or query counts, or use --search grid")
    source = open_source(
        backbone, task, layers, epochs=config.epochs, cache=config.cache, cache_dir=config.cache_dir,
        dtype=config.cache_dtype, max_gb=config.cache_max_gb, num_workers=config.num_workers,
        train_transform=backbone.train_transform if config.augment else None, verify=config.verify_cache,
        adapters=specs, batch_size=config.batch_size, cache_device=config.cache_device,
        memory_fraction=config.cache_memory_fraction, device=device,
    )
    require_memory_for_bank(specs, backbone.width, task.num_classes, device)
    bank = InCABank(specs, backbone.width, task.num_classes)
    logger.info("%s: training %d adapters together on layers %s", task.name, len(specs), layers)
    refuse_symlink(out_dir, "the task's output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT_FILE
    cached = isinstance(source, CachedSource)
    history = train_bank(
        bank, source, epochs=config.epochs, batch_size=config.batch_size, device=device, seed=config.seed,
        warmup_ratio=config.warmup_ratio, schedule=config.schedule, eval_split="val", checkpoint_path=checkpoint,
        halving=halving, checkpoint_identity=run_identity(backbone, task, layers, config), log=log,
    )
    best, val_acc = select_best(bank, source, "val")
    test_acc = evaluate_bank(bank, source, "test")
    provenance = {"backbone": backbone.describe(), "task": task.spec,
                  "training": {"epochs": config.epochs, "batch_size": config.batch_size, "seed": config.seed}}
    adapter = TaskAdapter.from_bank(bank, [best], task.classes, {
        **provenance, "val_accuracy": float(val_acc[best]), "test_accuracy": float(test_acc[best]),
    })
    world = current()  # data-parallel: every rank holds the same bank, rank 0 writes it
    if world.is_main:
        save_adapter(adapter, out_dir / ADAPTER_DIR)
    warnings: list[str] = []
    ensemble = _ensemble(bank, source, val_acc, config.ensemble, out_dir / ENSEMBLE_DIR, task, provenance, warnings)
    if world.is_main:
        checkpoint.unlink(missing_ok=True)  # the results and the adapter are written: nothing left to resume
    trainable = sum(p.numel() for p in adapter.parameters())
    backbone_params = backbone_parameter_count(backbone.model)
    trained = history.epochs_trained
    adapters = [
        {**asdict(s), "val_acc": _num(val_acc[i]), "test_acc": _num(test_acc[i]), "diverged": bool(bank.diverged[i]),
         "best_epoch": history.best_epoch[i], "final_train_loss": _num(history.train_loss[trained[i] - 1][i]),
         "epochs_trained": trained[i], "stopped_rung": history.stopped_rung[i],
         "epoch_loss": _curve(history.train_loss, i, trained[i]),
         "val_curve": _curve(history.val_accuracy, i, trained[i])}
        for i, s in enumerate(specs)
    ]
    steps = config.epochs * -(-source.num_rows("train") // (config.batch_size * world.size))
    return {
        "task": task.spec,
        "classes": task.classes,
        "sizes": task.sizes(),
        "baselines": baselines(task),
        "layers": layers,
        "activations": "cache" if cached else "live",
        "cache_path": str(source.cache.path) if cached else None,
        "cache_dtype": source.cache.dtype if cached else None,
        "cache_device": source.device if cached else None,
        "cache_decision": source.decision,  # what --cache auto measured to choose, if it measured
        "adapters": adapters,
        "best": {"index": best, **{k: v for k, v in adapters[best].items() if k not in CURVES},
                 "adapter_dir": str(out_dir / ADAPTER_DIR)},
        "val_acc": adapters[best]["val_acc"],
        "test_acc": adapters[best]["test_acc"],
        "ensemble": ensemble,
        "serve": serve(float(val_acc[best]), ensemble),
        "warnings": warnings,
        "trainable_params": trainable,
        "backbone_params": backbone_params,
        "trainable_percent": trainable_percent(trainable, backbone_params),
        "steps": steps,
        "search": config.search,
        "rungs": history.rungs,
        "adapter_epochs": sum(trained),
        "grid_adapter_epochs": len(specs) * config.epochs,
        "best_epoch": adapters[best]["best_epoch"],
        "loss_curve": [epoch[best] for epoch in history.train_loss[: trained[best]]],
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


def baselines(task: Task) -> dict[str, float | None]:
    """What an adapter has to beat: ``chance`` (1 / classes: guessing uniformly) and ``majority_val`` /
    ``majority_test``, the accuracy of always answering the train split's most frequent class."""
    majority = int(np.bincount(task.splits["train"].labels, minlength=task.num_classes).argmax())
    rates = {split: task.splits[split].labels for split in ("val", "test")}
    return {"chance": 1.0 / task.num_classes,
            **{f"majority_{split}": float((labels == majority).mean()) if len(labels) else None
               for split, labels in rates.items()}}


def serve(best_val: float, ensemble: dict[str, Any] | None) -> str:
    """What to serve a task with by default: ``"ensemble"`` only when :func:`ensemble_shortfall` finds none, else
    ``"adapter"``. The value is also the name of the directory it is saved in, under the task's."""
    made = ensemble is not None and ensemble.get("val_acc") is not None
    return ENSEMBLE_DIR if made and ensemble_shortfall(ensemble["val_acc"], best_val) is None else ADAPTER_DIR


def ensemble_shortfall(ensemble_val: float, best_val: float) -> str | None:
    """Why an ensemble is not served: ``"below"`` or ``"tied with"`` the best adapter on val, ``None`` when it is
    strictly above (a tie goes to the adapter: the same accuracy for one adapter's cost). Both are compared in
    float32, the precision the bank's accuracies have, so the same count of correct answers is a tie."""
    ensemble32, best32 = np.float32(ensemble_val), np.float32(best_val)
    if ensemble32 > best32:
        return None
    return "tied with" if ensemble32 == best32 else "below"


def _ensemble(
    bank: InCABank, source: ActivationSource, val_acc: torch.Tensor, k: int, directory: Path, task: Task,
    provenance: dict[str, Any], warnings: list[str],
) -> dict[str, Any] | None:
    """The top-``k`` adapters by val averaged (the InCA paper's parallel ensembling), saved and scored. Fewer than
    ``k`` adapters that did not diverge make a smaller ensemble, and fewer than two none (one adapter is the best
    adapter itself); both are warned about and added to ``warnings``."""
    if k < 2:
        return None
    members = top_adapters(val_acc, k)
    if len(members) < k:
        made = f"the ensemble has {len(members)} members" if len(members) >= 2 else "no ensemble is made"
        warnings.append(f"--ensemble {k} asked for {k} adapters and only {len(members)} of the {len(val_acc)} did not "
                        f"diverge: {made}")
        logger.warning("%s: %s", task.name, warnings[-1])
    if len(members) < 2:
        return {"requested": k, "k": len(members), "members": members}
    val, test = (evaluate_ensemble(bank, source, members, split) for split in ("val", "test"))
    ensemble = TaskAdapter.from_bank(bank, members, task.classes,
                                     {**provenance, "val_accuracy": val, "test_accuracy": test})
    if current().is_main:
        save_adapter(ensemble, directory)
    logger.info("%s: ensemble of the top %d adapters: val %.4f, test %.4f", task.name, len(members), val, test)
    best_val = float(val_acc[members[0]])
    shortfall = ensemble_shortfall(val, best_val)
    if shortfall is not None:
        warnings.append(f"the ensemble of {len(members)} is {shortfall} the best single adapter on val ({val:.4f} vs "
                        f"{best_val:.4f}): it is saved but not served by default")
        logger.warning("%s: %s", task.name, warnings[-1])
    params = sum(p.numel() for p in ensemble.parameters())
    return {"requested": k, "k": len(members), "members": members, "val_acc": val, "test_acc": test,
            "trainable_params": params, "adapter_dir": str(directory)}


def _curve(history: list[list[float]], adapter: int, epochs: int) -> list[float | None]:
    """Adapter ``adapter``'s values of its first ``epochs`` epochs in a :class:`~inca.train.bank.BankHistory` curve."""
    return [_num(row[adapter]) for row in history[:epochs]]


def _num(value: Any) -> float | None:
    """A JSON-safe float: NaN (diverged) becomes null."""
    value = float(value)
    return None if value != value else value
