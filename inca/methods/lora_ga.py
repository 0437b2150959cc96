"""``lora-ga``: LoRA initialised from the loss gradient (LoRA-GA, Wang et al., 2024), trained with the head.

Saved and loaded as a LoRA (the base-weight shift travels with it, see :mod:`inca.adapters.lora_ga`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inca import options as opt
from inca.methods import lora
from inca.methods.base import HF_TRAINER, ApplyContext, hparam
from inca.methods.registry import register_method
from inca.registry import lazy

if TYPE_CHECKING:
    from torch import nn

REPO = "Outsider565/LoRA-GA"
TRAINER = f"{REPO}, reproduce/utils.py (train_text_to_text_model)"


@dataclass(frozen=True, kw_only=True)
class LoRAGAConfig(lora.LoRAConfig):
    """LoRA's hyper-parameters where LoRA-GA's authors keep them (rank, alpha, targets, dropout), their
    deliberate changes (gradient init, stable scale with rsLoRA, full fine-tuning's learning rate) and their
    trainer's settings."""

    lr: float = hparam(1e-4, source=f"{REPO}, conf/model/t5base.yaml (learning_rate: 1e-4, as full fine-tuning): "
                                    "LoRA-GA starts on full fine-tuning's trajectory")
    weight_decay: float = hparam(0.0, source=f"{TRAINER} (weight_decay = 0)")
    warmup_ratio: float = hparam(0.03, source=f"{TRAINER} (warmup_ratio = 0.03)")
    schedule: str = hparam("cosine", source=f"{TRAINER} (lr_scheduler_type = \"cosine\")")
    max_grad_norm: float = hparam(1.0, source=f"{TRAINER}: {HF_TRAINER}; {REPO}, peft/examples/lora_ga_finetuning/"
                                              "float_llama2-7b_metamath.py (max_grad_norm=1.0)")
    rslora: bool = hparam(True, source=f"{REPO}, reproduce/Readme.md: LoRA-GA runs with peft.use_rslora=True "
                                       "(its +SO part)")
    gamma: float = hparam(16.0, help="gamma of the 'stable' scale d_out^(1/4) / sqrt(gamma)",
                          source=f"{REPO}, conf/init/gradient.yaml (stable_gamma: 16)")
    direction: str = hparam("ArB2r", help="which singular vectors of the gradient initialise A and B "
                                          "(ArB2r, ArBr, A2rBr, random)",
                            source=f"{REPO}, conf/init/gradient.yaml (direction: ArB2r)")
    scale: str = hparam("stable", help="scaling of A and B (stable, gd, unit, weight_svd)",
                        source=f"{REPO}, conf/init/gradient.yaml (scale: stable)")
    init_batches: int = hparam(8, help="training batches (of the run's batch size) whose mean gradient, in train "
                                       "mode, initialises A and B",
                               source=f"ours: 8 batches; the authors average over 8 samples ({REPO}, "
                                      "conf/init/gradient.yaml: bsz 1, iters 8), their PEFT example over 128 "
                                      "(2 x 64)", check=opt.positive_int)


def apply(model: nn.Module, config: LoRAGAConfig, context: ApplyContext) -> None:
    """LoRA, then A and B from the gradient of the first training batches; the base weight absorbs s B A."""
    from inca.adapters.lora_ga import init_lora_ga
    from inca.train.e2e import batch_loss

    lora.apply(model, config, context)
    loss = functools.partial(batch_loss, device=context.device)
    init_lora_ga(model, context.train_batches(config.init_batches), loss, config.gamma, config.direction,
                 config.scale, context.seed)


register_method(
    "lora-ga", LoRAGAConfig, "LoRA-GA (Wang et al., 2024): LoRA whose A, B start from the SVD of the loss "
    "gradient, the base weight shifted so the output is unchanged at init", apply=apply,
    save=lazy("inca.adapters.lora:save_lora"), load=lazy("inca.adapters.lora:load_lora"),
    export=lazy("inca.adapters.peft_export:export_peft"),
)  # fmt: skip
