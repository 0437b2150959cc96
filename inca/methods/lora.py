"""``lora``: LoRA (Hu et al., 2021) on the linear layers of every block, trained with the head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from inca.methods.base import HF_SCHEDULE, HF_TRAINER, ApplyContext, TrainConfig, hparam
from inca.methods.registry import register_method
from inca.options import DEFAULT_TARGET
from inca.registry import lazy

if TYPE_CHECKING:
    from torch import nn

TABLE_9 = "Hu et al. 2021, Table 9 (RoBERTa-base on GLUE)"
GLUE = "microsoft/LoRA, examples/NLU/roberta_base_mnli.sh"


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(TrainConfig):
    """LoRA's hyper-parameters: the LoRA authors' RoBERTa-base GLUE setting (their scripts, where the paper's
    table and the scripts differ)."""

    lr: float = hparam(5e-4, source=f"{TABLE_9}; {GLUE} (--learning_rate 5e-4)")
    weight_decay: float = hparam(0.1, source=f"{GLUE} (--weight_decay 0.1)")
    warmup_ratio: float = hparam(0.06, source=f"{TABLE_9}; {GLUE} (--warmup_ratio 0.06)")
    max_grad_norm: float = hparam(1.0, source=f"{GLUE} runs HF run_glue.py: {HF_TRAINER}")
    schedule: str = hparam("linear", source=f"{GLUE} passes no --lr_scheduler_type to HF run_glue.py: {HF_SCHEDULE}")
    rank: int = hparam(8, help="rank r of the update B A", source=f"{TABLE_9}; {GLUE} (--lora_r 8)")
    alpha: float = hparam(16.0, help="scale s = alpha / r (alpha / sqrt(r) with rslora)",
                          source=f"{GLUE} (--lora_alpha 16; the paper's Table 9 says 8)")
    rslora: bool = hparam(False, help="rank-stabilised scale alpha / sqrt(r) (Kalajdzievski, 2023)",
                          source="Hu et al. 2021, Section 4.1: s = alpha / r")
    dropout: float = hparam(0.0, help="dropout on the LoRA branch's input",
                            source="microsoft/LoRA, loralib/layers.py (lora_dropout=0.)")
    target: str = hparam(DEFAULT_TARGET, help="regex fullmatched against module names: the nn.Linear layers adapted",
                         source="ours: qkv, proj, fc1 and fc2 of every block (Hu et al. 2021, Section 4.2, "
                                "adapt attention weights only)")


def apply(model: nn.Module, config: LoRAConfig, context: ApplyContext) -> None:
    """Wrap the target layers with zero-initialised LoRA; only LoRA and the head train."""
    from inca.adapters.lora import apply_lora

    apply_lora(model, config.rank, config.alpha, config.target, config.rslora, config.dropout)


register_method(
    "lora", LoRAConfig, "LoRA (Hu et al., 2021): a trainable low-rank update s B A of each target nn.Linear, "
    "B = 0 at init; the head trains too", apply=apply, save=lazy("inca.adapters.lora:save_lora"),
    load=lazy("inca.adapters.lora:load_lora"), export=lazy("inca.adapters.peft_export:export_peft"),
)  # fmt: skip
