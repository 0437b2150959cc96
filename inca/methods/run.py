"""Running a registered method on a task: one entry point, :func:`run_method`, for every method.

An end-to-end method starts from a trainable copy of the frozen backbone (timm model + a new head for the
task, drawn under the run's seed, then started as ``RunConfig.head_init`` says), lets the method's ``apply``
say what trains, and trains with the one loop of :mod:`inca.train.e2e`, so every method's numbers come from
the same optimiser, schedule and batches. With ``RunConfig.lr_grid`` above 1 each configuration of the
method's :meth:`~inca.methods.base.TrainConfig.tuning_grid` trains from the same start, and the best on
validation is kept.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inca.activations import DataSource, ImageBatches
from inca.adapters.common import count_parameters, logit_layers
from inca.backbone import Backbone
from inca.distributed import current
from inca.errors import InCAError
from inca.inference import save_end_to_end
from inca.methods.base import PEFT_DIR, ApplyContext, MethodConfig, RunConfig, TrainConfig
from inca.methods.registry import Method, get_method
from inca.methods.result import EndToEndResult, MethodResult
from inca.tasks import SPLITS, Task
from inca.train.e2e import FitConfig, FitResult, fit, pooled_features, trainable_copy
from inca.train.runner import ADAPTER_DIR
from inca.training_log import TrainingLog, run_name

__all__ = ["PEFT_DIR", "build_model", "probe_head", "run_method", "seeded", "train_e2e"]

logger = logging.getLogger(__name__)


Hparams = MethodConfig | Mapping[str, Any]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's and Python's RNGs seeded for one run (same head, adapter init, dropout and augmentation for a
    seed; timm's random crop draws from Python's), both restored after."""
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            random.seed(seed)
            yield
    finally:
        random.setstate(state)


def _end_to_end(name: str) -> Method:
    method = get_method(name)
    if method.apply is None:
        raise InCAError(f"method {name!r} does not train a copy of the backbone")
    return method


def _fit_config(config: TrainConfig, settings: RunConfig, desc: str) -> FitConfig:
    return FitConfig(
        settings.epochs, settings.batch_size, config.lr, config.weight_decay, config.warmup_ratio, settings.seed,
        settings.progress, desc=desc, max_grad_norm=config.max_grad_norm, schedule=config.schedule,
    )  # fmt: skip


def probe_head(model: nn.Module, data: DataSource, settings: RunConfig) -> dict[str, torch.Tensor]:
    """The head of ``model`` fitted on its frozen pooled features (un-augmented, computed once) exactly as the
    ``linear`` method fits its own (its default config, the run's epochs, batches and seed): the start of
    linear-probe-then-fine-tune (Kumar et al., "Fine-Tuning can Distort Pretrained Features", ICLR 2022).
    Returned as a CPU state dict; ``model`` is left as it was."""
    head = copy.deepcopy(logit_layers(model)[0]).requires_grad_(True)
    features = pooled_features(model, data, settings.batch_size, SPLITS)
    fit(head, features, _fit_config(get_method("linear").make_config(), settings, "linear-probe head"))
    return {k: v.detach().cpu() for k, v in head.state_dict().items()}


def fit_head(
    model: nn.Module, features: DataSource, fit_config: FitConfig, log: TrainingLog | None = None
) -> FitResult:
    """Fit ``model``'s head on its pooled ``features``. A distilled DeiT's second head takes the same weights,
    so the average of its two heads' logits is this head's."""
    first, *others = logit_layers(model)
    result = fit(first, features, fit_config, log)
    for other in others:
        other.load_state_dict(first.state_dict())
    return result


def _start_head(
    model: nn.Module, settings: RunConfig, head: Mapping[str, torch.Tensor] | None, data: DataSource
) -> None:
    """Start the freshly drawn head as ``settings.head_init`` says (``head``: a linear-probe head fitted before)."""
    if settings.head_init == "random":
        return
    layers = logit_layers(model)
    if settings.head_init == "zero":
        head = {k: torch.zeros_like(v) for k, v in layers[0].state_dict().items()}
    elif head is None:
        head = probe_head(model, data, settings)
    for layer in layers:  # a distilled DeiT's two heads start alike: their averaged logits are the probe's
        layer.load_state_dict(head)


def build_model(
    name: str, backbone: Backbone, num_classes: int, hparams: Hparams, data: DataSource, settings: RunConfig,
    head: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:  # fmt: skip
    """A trainable copy of the backbone for end-to-end method ``name`` (``data``: the head's linear probe and
    LoRA-GA's init batches). The head starts as ``settings.head_init`` says (``head``: a linear probe fitted
    already) unless the method trains only the head."""
    method = _end_to_end(name)
    config: TrainConfig = method.make_config(hparams)
    model = trainable_copy(backbone, num_classes, pool=config.head_pool)
    if not method.features_only:
        _start_head(model, settings, head, data)
    method.apply(model, config, ApplyContext(data, settings.batch_size, settings.seed, backbone.device))
    return model


def train_e2e(
    name: str, backbone: Backbone, task: Task, hparams: Hparams, settings: RunConfig,
    head: Mapping[str, torch.Tensor] | None = None, log: TrainingLog | None = None,
) -> tuple[nn.Module, FitResult]:  # fmt: skip
    """Train end-to-end method ``name`` on ``task``: the trained timm model (best epoch by val) and its
    :class:`FitResult`. ``hparams``: the method's config, or some of its hyper-parameters (the rest default);
    ``head``: the linear-probe head when one was fitted already (:func:`probe_head`); ``log``: where its epochs
    go in TensorBoard."""
    method = _end_to_end(name)
    config: TrainConfig = method.make_config(hparams)
    data = ImageBatches(task, backbone, settings.num_workers, augment=settings.augment and not method.features_only)
    fit_config = _fit_config(config, settings, f"{name} on {task.name}")
    if head is None:
        head = _task_probe_head(method, backbone, task, config, settings)
    with seeded(settings.seed, backbone.device):
        model = build_model(name, backbone, task.num_classes, config, data, settings, head)
        if method.features_only:
            features = pooled_features(model, data, settings.batch_size, SPLITS)
            return model, fit_head(model, features, fit_config, log)
        return model, fit(model, data, fit_config, log)


def _task_probe_head(
    method: Method, backbone: Backbone, task: Task, config: TrainConfig, settings: RunConfig
) -> dict[str, torch.Tensor] | None:
    """The linear-probe head of ``task`` under the run's seed when the protocol starts heads from one, else None."""
    if settings.head_init != "linear-probe" or method.features_only:
        return None
    with seeded(settings.seed, backbone.device):
        model = trainable_copy(backbone, task.num_classes, config.head_pool)
        return probe_head(model, ImageBatches(task, backbone, settings.num_workers), settings)


def _tuned(config: TrainConfig, default: TrainConfig) -> dict[str, Any]:
    """The hyper-parameters where a grid point differs from the method's config (always its lr)."""
    values, base = config.to_dict(), default.to_dict()
    return {"lr": config.lr, **{k: v for k, v in values.items() if v != base[k] and k != "lr"}}


def run_e2e(
    method: Method, backbone: Backbone, task: Task, config: MethodConfig, settings: RunConfig,
    work_dir: str | os.PathLike, log: TrainingLog | None = None,
) -> EndToEndResult:  # fmt: skip
    """Train an end-to-end method, over its tuning grid when ``settings.lr_grid`` > 1 (every point from the
    same start, the best on val kept; ties keep the earlier point, the method's own config first); with
    ``settings.export_peft`` also export it (``work_dir/peft``)."""
    head = _task_probe_head(method, backbone, task, config, settings)  # once: every grid point starts the same
    grid, best = [], None
    points = list(config.tuning_grid(settings.lr_grid))
    for point in points:
        point_log = log.scoped(run_name(_tuned(point, config))) if log is not None and len(points) > 1 else log
        model, result = train_e2e(method.name, backbone, task, point, settings, head, point_log)
        grid.append({**_tuned(point, config), "val_acc": result.val_acc, "best_epoch": result.best_epoch,
                     "diverged_at_step": result.diverged_at_step})
        if best is None or result.val_acc > best[2].val_acc:
            best = (point, model, result)
        del model
    point, model, result = best
    if len(grid) > 1:
        logger.info("%s on %s: %s chosen on val out of %d", method.name, task.name, _tuned(point, config), len(grid))
    if current().is_main:  # inca's own format, which inca-predict serves: work_dir/adapter, as an InCA adapter's
        save_end_to_end(method.name, model, Path(work_dir) / ADAPTER_DIR, backbone, task.classes, point.head_pool, {
            "task": task.spec, "hparams": point.to_dict(), "val_accuracy": result.val_acc,
            "test_accuracy": result.test_acc,
            "training": {"epochs": settings.epochs, "batch_size": settings.batch_size, "seed": settings.seed},
        })  # fmt: skip
    peft_dir = None
    if settings.export_peft and method.export is not None:
        peft_dir = Path(work_dir) / PEFT_DIR
        if current().is_main:  # data-parallel ranks hold the same model: one writes it
            method.export(model, peft_dir, backbone, config.head_pool)
        logger.info("%s on %s: PEFT adapter written to %s", method.name, task.name, peft_dir)
    return EndToEndResult(
        test_acc=result.test_acc, val_acc=result.val_acc, best_epoch=result.best_epoch,
        trainable_params=count_parameters(model).trainable, steps=result.steps, loss_curve=result.loss_curve,
        tuned=_tuned(point, config), epoch_loss=result.epoch_loss, val_curve=result.val_curve,
        diverged_at_step=result.diverged_at_step,
        grid=grid, peft_dir=None if peft_dir is None else str(peft_dir),
    )  # fmt: skip


def run_method(
    name: str, backbone: Backbone, task: Task, hparams: Hparams, settings: RunConfig,
    work_dir: str | os.PathLike, log: TrainingLog | None = None,
) -> MethodResult:  # fmt: skip
    """Train method ``name`` on ``task``: its :class:`~inca.methods.result.MethodResult` (test/val accuracy at
    the best epoch by val, trainable parameters, steps, training loss, ...). ``work_dir`` is where a method may
    write files; ``log``, where its epochs go in TensorBoard (a grid of tuned values: one run per point)."""
    method = get_method(name)
    run = method.run or run_e2e
    return run(method, backbone, task, method.make_config(hparams), settings, work_dir, log=log)
