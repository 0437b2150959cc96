"""``lora``: LoRA (Hu et al., 2021) on the linear layers of every block, trained with the head."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from inca.adapters.common import DEFAULT_TARGET
from inca.adapters.lora import apply_lora, export_peft, load_lora, save_lora
from inca.methods.base import ApplyContext, TrainConfig, hparam
from inca.methods.registry import register_method

TABLE_9 = "Hu et al. 2021, Table 9 (RoBERTa-base on GLUE)"


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(TrainConfig):
    """LoRA's hyper-parameters: RoBERTa-base's GLUE setting of the LoRA paper where it gives one."""

    lr: float = hparam(5e-4, source=TABLE_9)
    warmup_ratio: float = hparam(0.06, source=TABLE_9)
    rank: int = hparam(8, help="rank r of the update B A", source=TABLE_9)
    alpha: float = hparam(8.0, help="scale s = alpha / r (alpha / sqrt(r) with rslora)", source=TABLE_9)
    rslora: bool = hparam(False, help="rank-stabilised scale alpha / sqrt(r) (Kalajdzievski, 2023)",
                          source="Hu et al. 2021, Section 4.1: s = alpha / r")
    dropout: float = hparam(0.0, help="dropout on the LoRA branch's input",
                            source="microsoft/LoRA, loralib/layers.py (lora_dropout=0.)")
    target: str = hparam(DEFAULT_TARGET, help="regex fullmatched against module names: the nn.Linear layers adapted",
                         source="ours: qkv, proj, fc1 and fc2 of every block (Hu et al. 2021, Section 4.2, "
                                "adapt attention weights only)")


def apply(model: nn.Module, config: LoRAConfig, context: ApplyContext) -> None:
    """Wrap the target layers with zero-initialised LoRA; only LoRA and the head train."""
    apply_lora(model, config.rank, config.alpha, config.target, config.rslora, config.dropout)


register_method(
    "lora", LoRAConfig, "LoRA (Hu et al., 2021): a trainable low-rank update s B A of each target nn.Linear, "
    "B = 0 at init; the head trains too", apply=apply, save=save_lora, load=load_lora, export=export_peft,
)  # fmt: skip
