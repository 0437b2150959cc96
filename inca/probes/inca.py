"""``inca``: an InCA adapter (Dukler et al., 2023) per probed layer, one bank trained on their tokens at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from inca import options as opt
from inca.config import hparam
from inca.probes.base import OURS, ProbeConfig, ProbeRunConfig
from inca.probes.registry import Scores, register_probe
from inca.train import config as train_config
from inca.train.config import SearchConfig

if TYPE_CHECKING:
    from inca.activations import RecordingSource
    from inca.backbone import Backbone
    from inca.tasks import Task

# Set from inca-train's defaults (so the two never drift apart), at inca's own, untuned, ratios.
TRAIN_LR = train_config.InCAGridConfig.default("lr")[0]
TRAIN_EPOCHS = train_config.InCATrainConfig.default("epochs")
QUICK = (f"{OURS}, not tuned: a probe ranks layers rather than delivering the adapter, so half of inca-train's "
         f"{TRAIN_EPOCHS} epochs at three times its learning rate of {TRAIN_LR:g}, the larger steps making up for "
         "the shorter schedule")


@dataclass(frozen=True, kw_only=True)
class InCAProbeConfig(ProbeConfig, SearchConfig):
    """The InCA probe's training (one adapter per layer, the paper's default adapter shape), for every epoch or by
    successive halving over the layers (``search``); each layer's adapter is scored at its best val epoch."""

    lr: float = hparam(3 * TRAIN_LR, help="learning rate of every adapter",
                       source=QUICK, check=opt.positive_float)
    epochs: int = hparam(TRAIN_EPOCHS // 2, help="epochs over the train split",
                         source=QUICK, check=opt.positive_int)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_search(self.epochs)


def fit(source: RecordingSource, backbone: Backbone, task: Task, layers: list[int], config: InCAProbeConfig,
        run: ProbeRunConfig) -> Scores:
    """Train the bank, validating every epoch; each layer's adapter is scored at its best epoch on val (the epoch
    whose weights it ends with, as every adapter and method of inca is), on val and on test."""
    import math

    from inca.adapters.inca import AdapterSpec, InCABank
    from inca.train.bank import evaluate_bank, train_bank

    specs = [AdapterSpec(layer=layer, num_heads=backbone.num_heads, lr=config.lr, seed=run.seed) for layer in layers]
    bank = InCABank(specs, backbone.width, task.num_classes)
    halving = config.halving() if len(layers) > 1 else None  # one layer: nothing to choose between
    history = train_bank(bank, source, epochs=config.epochs, batch_size=run.batch_size, device=backbone.device,
                         seed=run.seed, eval_split="val", halving=halving)
    test = evaluate_bank(bank, source, "test", run.batch_size)
    scores = {}
    for i, layer in enumerate(layers):
        epoch = history.best_epoch[i]  # 0: never a finite accuracy (diverged from the start)
        val = history.val_accuracy[epoch - 1][i] if epoch else math.nan
        scores[layer] = {"val": float(val), "test": float(test[i]), "best_epoch": epoch}
    return scores


register_probe("inca", InCAProbeConfig, "an InCA adapter per layer, all trained at once on the layers' tokens",
               fit=fit, reads="tokens")
