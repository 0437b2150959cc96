"""``lora-ga``: LoRA initialised from the loss gradient (LoRA-GA, Wang et al., 2024), trained with the head.

Saved and loaded as a LoRA (the base-weight shift travels with it, see :mod:`inca.adapters.lora_ga`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from inca.adapters.common import DEFAULT_TARGET
from inca.adapters.lora import export_peft, load_lora, save_lora
from inca.adapters.lora_ga import init_lora_ga
from inca.errors import InCAError
from inca.methods import lora
from inca.methods.base import ApplyContext, hparam
from inca.methods.registry import register_method
from inca.train.e2e import batch_loss

PAPER = "Wang et al. 2024, Section 4"
REPO = "Outsider565/LoRA-GA"


@dataclass(frozen=True, kw_only=True)
class LoRAGAConfig(lora.LoRAConfig):
    """LoRA's hyper-parameters at LoRA-GA's defaults, plus how the gradient initialises A and B."""

    lr: float = hparam(1e-4, source=f"{REPO}, conf/model/t5base.yaml (learning_rate: 1e-4, as full fine-tuning): "
                                    "LoRA-GA starts on full fine-tuning's trajectory")
    warmup_ratio: float = hparam(0.1, source="ours: one value for every end-to-end method")
    rank: int = hparam(8, source=f"{PAPER} (rank 8 on T5-base)")
    alpha: float = hparam(16.0, source=f"{REPO}, reproduce/conf/peft/all.yaml (lora_alpha: 16)")
    rslora: bool = hparam(True, source=f"{PAPER}: the paper's configuration uses rsLoRA's alpha / sqrt(r)")
    target: str = hparam(DEFAULT_TARGET,
                         source=f"{REPO}, reproduce/conf/peft/all.yaml (lora_target_modules: all linear layers)")
    gamma: float = hparam(16.0, help="gamma of the 'stable' scale d_out^(1/4) / sqrt(gamma)",
                          source=f"{REPO}, conf/init/gradient.yaml (stable_gamma: 16)")
    direction: str = hparam("ArB2r", help="which singular vectors of the gradient initialise A and B "
                                          "(ArB2r, ArBr, A2rBr, random)",
                            source=f"{REPO}, conf/init/gradient.yaml (direction: ArB2r)")
    scale: str = hparam("stable", help="scaling of A and B (stable, gd, unit, weight_svd)",
                        source=f"{REPO}, conf/init/gradient.yaml (scale: stable)")
    init_batches: int = hparam(8, help="training batches whose mean gradient initialises A and B",
                               source=f"{REPO}, conf/init/gradient.yaml (iters: 8)")

    def __post_init__(self) -> None:
        if self.init_batches < 1:
            raise InCAError(f"lora-ga.init_batches must be at least 1, got {self.init_batches}")


def apply(model: nn.Module, config: LoRAGAConfig, context: ApplyContext) -> None:
    """LoRA, then A and B from the gradient of the first training batches; the base weight absorbs s B A."""
    lora.apply(model, config, context)
    loss = functools.partial(batch_loss, device=context.device)
    init_lora_ga(model, context.train_batches(config.init_batches), loss, config.gamma, config.direction,
                 config.scale, context.seed)


register_method(
    "lora-ga", LoRAGAConfig, "LoRA-GA (Wang et al., 2024): LoRA whose A, B start from the SVD of the loss "
    "gradient, the base weight shifted so the output is unchanged at init", apply=apply, save=save_lora,
    load=load_lora, export=export_peft,
)  # fmt: skip
