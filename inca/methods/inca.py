"""``inca``: a bank of InCA cross-attention adapters (Dukler et al., 2023) on the live frozen backbone.

Unlike the end-to-end methods it trains no copy of the backbone: one adapter per chosen layer (and per grid
point) reads that layer's activations, all trained together by :func:`inca.train.runner.train_inca_task`;
the best on val is reported and saved under the run's ``work_dir/adapter``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from inca.backbone import Backbone, resolve_layers
from inca.methods.base import MethodConfig, RunSettings, hparam, lr_candidates
from inca.methods.registry import Method, register_method
from inca.methods.result import InCAResult
from inca.methods.run import seeded
from inca.tasks import Task
from inca.train.runner import InCAOptions, train_inca_task

PAPER = "Dukler et al. 2023"
OPTIONS = "inca.train.runner.InCAOptions' default"


@dataclass(frozen=True, kw_only=True)
class InCAConfig(MethodConfig):
    """InCA's hyper-parameters: the layers, and the grid of adapters the bank trains at once."""

    layers: str = hparam("all", help="layers read by an adapter each: all | -1 | 0,5,11 | last:K",
                         source="ours: one adapter per layer in one bank, the best chosen on val")
    lr: list[float] = hparam([1e-3], help="learning rates (a grid: the bank trains every combination)",
                             source=OPTIONS)
    weight_decay: list[float] = hparam([1e-4], help="weight decays (grid)", source=OPTIONS)
    warmup_ratio: float = hparam(0.1, help="fraction of all steps that warm the learning rate up linearly",
                                 source=OPTIONS)
    queries: list[int] = hparam([1], help="learned queries per adapter (grid)", source=f"{PAPER}: one query")
    heads: list[int] = hparam([], help="attention heads (grid); empty: the backbone's number of heads",
                              source=f"{PAPER}: the backbone's number of heads")
    mlp_ratio: list[float] = hparam([0.0], help="adapter MLP width / model width, 0 = no MLP (grid)",
                                    source=f"{PAPER}: no MLP")
    cache: str = hparam("auto", help="activations from an on-disk store: auto | always | never",
                        source=OPTIONS)


def run(
    method: Method, backbone: Backbone, task: Task, config: InCAConfig, settings: RunSettings,
    work_dir: str | os.PathLike,
) -> InCAResult:  # fmt: skip
    """Train the config's grid as one bank on the live backbone (each learning rate widened to
    ``settings.lr_grid`` values, as the end-to-end methods are tuned; augmented views streamed live with
    ``settings.augment``); the best adapter on val at its best epoch, and its figures."""
    layers = resolve_layers(config.layers, backbone.num_blocks)
    grid = {key: value for key, value in config.to_dict().items() if key != "layers"}
    grid["lr"] = sorted({lr for base in config.lr for lr in lr_candidates(base, settings.lr_grid)})
    options = InCAOptions(
        **grid, adapter_seeds=[settings.seed], epochs=settings.epochs, batch_size=settings.batch_size,
        seed=settings.seed, num_workers=settings.num_workers, augment=settings.augment,
    )  # fmt: skip
    with seeded(settings.seed, backbone.device):  # the augmentation's draws
        result = train_inca_task(backbone, task, layers, options, work_dir)
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
