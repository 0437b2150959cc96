"""``inca``: a bank of InCA cross-attention adapters (Dukler et al., 2023) on the live frozen backbone.

Unlike the end-to-end methods it trains no copy of the backbone: one adapter per chosen layer (and per grid
point) reads that layer's activations, all trained together by :func:`inca.train.runner.train_inca_task`;
the best on val is reported and saved under the run's ``work_dir/adapter``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inca import options as opt
from inca.errors import InCAError
from inca.methods.base import MethodConfig, RunConfig, hparam, lr_candidates
from inca.methods.registry import Method, register_method
from inca.methods.result import InCAResult
from inca.probes.base import ProbeRunConfig
from inca.probes.ranking import RANK_BY, RANK_BY_SOURCE, LayerRanking, best_count, check_rank_by, rank_on_val
from inca.train.config import InCAGridConfig, InCATrainConfig

if TYPE_CHECKING:
    from inca.backbone import Backbone
    from inca.tasks import Task
    from inca.training_log import TrainingLog


@dataclass(frozen=True, kw_only=True)
class InCAConfig(InCAGridConfig, MethodConfig):
    """InCA's hyper-parameters in a comparison: ``inca-train``'s grid of adapters (the bank trains every
    combination at once) and the layers they read; epochs, batch size and seed are the comparison's."""

    layers: str = hparam(
        "all", check=opt.layer_spec,
        help="layers read by an adapter each: all | -1 | 0,5,11 | last:K | best:K (the K layers that the rank_by "
             "probe, run on the train and val splits, ranks best on val)",
        source="inca's own choice: one adapter per layer in one bank, the best chosen on val",
    )  # fmt: skip
    rank_by: str = hparam(RANK_BY, help="the probe whose val ranking layers=best:K follows", source=RANK_BY_SOURCE,
                          check=check_rank_by)

    def per_layer(self, lr_grid: int) -> dict[str, int]:
        """The grid's size along each axis but the layers (learning rates widened to ``lr_grid`` values each)."""
        sizes = {key: len(getattr(self, key)) or 1 for key in InCAGridConfig.grid_axes()}  # no heads: one value
        return {**sizes, "lr": len(learning_rates(self.lr, lr_grid))}

    def configurations(self, lr_grid: int, num_blocks: int) -> dict[str, int]:
        """Adapters the bank trains per task, by grid axis: the per-layer grid x the layers."""
        from inca.backbone import resolve_layers

        count = best_count(self.layers)
        return {**self.per_layer(lr_grid), "layers": count or len(resolve_layers(self.layers, num_blocks))}

    def within_budget(self, lr_grid: int) -> dict[str, Any]:
        """The hyper-parameters that make the bank ``lr_grid`` adapters (the budget): its per-layer grid on the best
        ``lr_grid / per-layer`` layers by the linear probe's val ranking (refused unless that divides). The linear
        probe, whatever ``rank_by`` says: a logistic regression on pooled features, as cheap as the head every
        end-to-end method fits first, where the InCA probe would train an adapter per layer beyond the budget."""
        size = math.prod(self.per_layer(lr_grid).values())
        if lr_grid % size:
            raise InCAError(f"--equal-budget: inca's grid has {size} adapters per layer, which does not divide the "
                            f"budget of {lr_grid} configurations; give inca one value per grid axis (--method-args)")
        return {"layers": f"best:{lr_grid // size}", "rank_by": "linear"}


def run(
    method: Method, backbone: Backbone, task: Task, config: InCAConfig, settings: RunConfig,
    work_dir: str | os.PathLike, log: TrainingLog | None = None,
) -> InCAResult:  # fmt: skip
    """Train the config's grid as one bank on the live backbone (each learning rate widened to
    ``settings.lr_grid`` values, as the end-to-end methods are tuned; augmented views streamed live with
    ``settings.augment``); the best adapter on val at its best epoch, and its figures."""
    from inca.backbone import resolve_layers
    from inca.methods.run import seeded
    from inca.train.runner import train_inca_task

    ranking = _best_layers(backbone, task, config, settings)
    layers = ranking.best(best_count(config.layers)) if ranking else resolve_layers(config.layers, backbone.num_blocks)
    grid = {key: getattr(config, key) for key in InCAGridConfig.fields()}
    grid["lr"] = learning_rates(config.lr, settings.lr_grid)
    train_config = InCATrainConfig(
        **grid, adapter_seeds=[settings.seed], epochs=settings.epochs, batch_size=settings.batch_size,
        seed=settings.seed, num_workers=settings.num_workers, augment=settings.augment,
    )  # fmt: skip
    with seeded(settings.seed, backbone.device):  # the augmentation's draws
        result = train_inca_task(backbone, task, layers, train_config, work_dir, log=log)
    best = json.loads(json.dumps(result["best"], default=str))
    chosen = result["adapters"][best["index"]]
    return InCAResult(
        test_acc=float(result["test_acc"]),
        val_acc=float(result["val_acc"]),
        best_epoch=int(result["best_epoch"]),
        trainable_params=int(result["trainable_params"]),
        steps=int(result["steps"]),
        loss_curve=[float(x) for x in result["loss_curve"]],  # one value per epoch (the bank trainer's)
        tuned={"lr": best["lr"], "layer": best["layer"]},
        epoch_loss=chosen["epoch_loss"],
        val_curve=chosen["val_curve"],
        activations=result["activations"],
        best=best,
        layer_ranking=ranking.to_dict() if ranking else None,
    )


def learning_rates(lrs: list[float], lr_grid: int) -> list[float]:
    """Each of the grid's learning rates widened to ``lr_grid`` values, as the end-to-end methods are tuned."""
    return sorted({lr for base in lrs for lr in lr_candidates(base, lr_grid)})


def _best_layers(backbone: Backbone, task: Task, config: InCAConfig, settings: RunConfig) -> LayerRanking | None:
    """For ``layers=best:K``, every layer ranked by the ``rank_by`` probe on train and val (None otherwise)."""
    count = best_count(config.layers)
    if count is None:
        return None
    if count > backbone.num_blocks:
        raise InCAError(f"inca.layers={config.layers}: the backbone has {backbone.num_blocks} blocks, use best:1.."
                        f"best:{backbone.num_blocks}")
    run = ProbeRunConfig(batch_size=settings.batch_size, seed=settings.seed, num_workers=settings.num_workers)
    return rank_on_val(backbone, task, list(range(backbone.num_blocks)), config.rank_by, run)


register_method(
    "inca", InCAConfig, "InCA (Dukler et al., 2023): cross-attention adapters reading the frozen backbone's "
    "activations, a bank of them trained at once on the live backbone (no copy)", run=run, shares_backbone=True,
)  # fmt: skip
