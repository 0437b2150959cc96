"""``inca``: a bank of InCA cross-attention adapters (Dukler et al., 2023) on the live frozen backbone.

Unlike the end-to-end methods it trains no copy of the backbone: one adapter per chosen layer (and per grid
point) reads that layer's activations, all trained together by :func:`inca.train.runner.train_inca_task`;
the best on val is reported and saved under the run's ``work_dir/adapter``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inca import options as opt
from inca.methods.base import MethodConfig, RunConfig, hparam, lr_candidates
from inca.methods.registry import Method, register_method
from inca.methods.result import InCAResult
from inca.train.config import InCAGridConfig, InCATrainConfig

if TYPE_CHECKING:
    from inca.backbone import Backbone
    from inca.tasks import Task


@dataclass(frozen=True, kw_only=True)
class InCAConfig(InCAGridConfig, MethodConfig):
    """InCA's hyper-parameters in a comparison: ``inca-train``'s grid of adapters (the bank trains every
    combination at once) and the layers they read; epochs, batch size and seed are the comparison's."""

    layers: str = hparam("all", help="layers read by an adapter each: all | -1 | 0,5,11 | last:K",
                         source="inca's own choice: one adapter per layer in one bank, the best chosen on val",
                         check=opt.layer_spec)


def run(
    method: Method, backbone: Backbone, task: Task, config: InCAConfig, settings: RunConfig,
    work_dir: str | os.PathLike,
) -> InCAResult:  # fmt: skip
    """Train the config's grid as one bank on the live backbone (each learning rate widened to
    ``settings.lr_grid`` values, as the end-to-end methods are tuned; augmented views streamed live with
    ``settings.augment``); the best adapter on val at its best epoch, and its figures."""
    from inca.backbone import resolve_layers
    from inca.methods.run import seeded
    from inca.train.runner import train_inca_task

    layers = resolve_layers(config.layers, backbone.num_blocks)
    grid = {key: getattr(config, key) for key in InCAGridConfig.fields()}
    grid["lr"] = sorted({lr for base in config.lr for lr in lr_candidates(base, settings.lr_grid)})
    train_config = InCATrainConfig(
        **grid, adapter_seeds=[settings.seed], epochs=settings.epochs, batch_size=settings.batch_size,
        seed=settings.seed, num_workers=settings.num_workers, augment=settings.augment,
    )  # fmt: skip
    with seeded(settings.seed, backbone.device):  # the augmentation's draws
        result = train_inca_task(backbone, task, layers, train_config, work_dir)
    best = json.loads(json.dumps(result["best"], default=str))
    return InCAResult(
        test_acc=float(result["test_acc"]),
        val_acc=float(result["val_acc"]),
        best_epoch=int(result["best_epoch"]),
        trainable_params=int(result["trainable_params"]),
        steps=int(result["steps"]),
        loss_curve=[float(x) for x in result["loss_curve"]],  # one value per epoch (the bank trainer's)
        tuned={"lr": best["lr"], "layer": best["layer"]},
        activations=result["activations"],
        best=best,
    )


register_method(
    "inca", InCAConfig, "InCA (Dukler et al., 2023): cross-attention adapters reading the frozen backbone's "
    "activations, a bank of them trained at once on the live backbone (no copy)", run=run, shares_backbone=True,
)  # fmt: skip
