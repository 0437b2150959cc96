"""Running a registered method on a task: one entry point, :func:`run_method`, for every method.

An end-to-end method starts from a trainable copy of the frozen backbone (timm model + a new head for the
task, drawn under the run's seed), lets the method's ``apply`` say what trains, and trains with the one loop
of :mod:`inca.train.e2e`, so every method's numbers come from the same optimiser, schedule and batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inca.adapters.common import count_parameters
from inca.backbone import Backbone
from inca.errors import InCAError
from inca.methods.base import ApplyContext, MethodConfig, RunSettings, TrainConfig
from inca.methods.registry import Method, get_method
from inca.tasks import SPLITS, Task
from inca.train.e2e import Batches, FitConfig, FitResult, ImageBatches, fit, pooled_features, trainable_copy

__all__ = ["PEFT_DIR", "build_model", "run_method", "train_e2e"]

logger = logging.getLogger(__name__)

PEFT_DIR = "peft"  # under a run's work_dir: the PEFT export of a LoRA-type model (RunSettings.export_peft)

Hparams = MethodConfig | Mapping[str, Any]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's RNGs seeded for one method (same head, adapter init and dropout for a seed), restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _end_to_end(name: str) -> Method:
    method = get_method(name)
    if method.apply is None:
        raise InCAError(f"method {name!r} does not train a copy of the backbone")
    return method


def build_model(
    name: str, backbone: Backbone, num_classes: int, hparams: Hparams, data: Batches, settings: RunSettings
) -> nn.Module:
    """A trainable copy of the backbone for end-to-end method ``name`` (``data``: LoRA-GA's init batches)."""
    method = _end_to_end(name)
    config: TrainConfig = method.make_config(hparams)
    model = trainable_copy(backbone, num_classes, pool=config.head_pool)
    method.apply(model, config, ApplyContext(data, settings.batch_size, settings.seed, backbone.device))
    return model


def train_e2e(
    name: str, backbone: Backbone, task: Task, hparams: Hparams, settings: RunSettings
) -> tuple[nn.Module, FitResult]:
    """Train end-to-end method ``name`` on ``task``: the trained timm model (best epoch by val) and its
    :class:`FitResult`. ``hparams``: the method's config, or some of its hyper-parameters (the rest default)."""
    method = _end_to_end(name)
    config: TrainConfig = method.make_config(hparams)
    data = ImageBatches(task, backbone, settings.num_workers)
    fit_config = FitConfig(
        settings.epochs, settings.batch_size, config.lr, config.weight_decay, config.warmup_ratio, settings.seed,
        settings.progress, desc=f"{name} on {task.spec}",
    )  # fmt: skip
    with _seeded(settings.seed, backbone.device):
        model = build_model(name, backbone, task.num_classes, config, data, settings)
        if method.features_only:
            features = pooled_features(model, data, settings.batch_size, SPLITS)
            return model, fit(model.get_classifier(), features, fit_config)
        return model, fit(model, data, fit_config)


def run_e2e(
    method: Method, backbone: Backbone, task: Task, config: MethodConfig, settings: RunSettings,
    work_dir: str | os.PathLike,
) -> dict[str, Any]:  # fmt: skip
    """Train an end-to-end method; with ``settings.export_peft`` also export it (``work_dir/peft``)."""
    model, result = train_e2e(method.name, backbone, task, config, settings)
    metrics = {
        "test_acc": result.test_acc,
        "val_acc": result.val_acc,
        "best_epoch": result.best_epoch,
        "trainable_params": count_parameters(model).trainable,
        "steps": result.steps,
        "val_curve": result.val_curve,
        "loss_curve": result.loss_curve,
        "diverged_at_step": result.diverged_at_step,
    }
    if settings.export_peft and method.export is not None:
        target = Path(work_dir) / PEFT_DIR
        method.export(model, target)
        metrics["peft_dir"] = str(target)
        logger.info("%s on %s: PEFT adapter written to %s", method.name, task.spec, target)
    return metrics


def run_method(
    name: str, backbone: Backbone, task: Task, hparams: Hparams, settings: RunSettings,
    work_dir: str | os.PathLike,
) -> dict[str, Any]:  # fmt: skip
    """Train method ``name`` on ``task``: test/val accuracy (best epoch by val), trainable parameters, steps,
    per-step training loss, ... (a JSON-ready dict). ``work_dir`` is where a method may write files."""
    method = get_method(name)
    run = method.run or run_e2e
    return run(method, backbone, task, method.make_config(hparams), settings, work_dir)
