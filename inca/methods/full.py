"""``full``: full fine-tuning, every backbone parameter and the new head."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inca.methods.base import ApplyContext, TrainConfig, hparam

if TYPE_CHECKING:
    from torch import nn
from inca.methods.registry import register_method

BASELINE = "Outsider565/LoRA-GA, reproduce/utils.py (train_text_to_text_model, the trainer of its full fine-tuning"


@dataclass(frozen=True, kw_only=True)
class FullConfig(TrainConfig):
    """Full fine-tuning's hyper-parameters: LoRA-GA's full fine-tuning baseline, the run LoRA-GA claims to
    track."""

    lr: float = hparam(1e-4, source="Wang et al. 2024 (LoRA-GA) fine-tune T5-base fully at 1e-4: Outsider565/LoRA-GA, "
                                    "conf/model/t5base.yaml (learning_rate: 1e-4)")
    weight_decay: float = hparam(0.0, source=f"{BASELINE} baseline: weight_decay = 0)")
    warmup_ratio: float = hparam(0.03, source=f"{BASELINE} baseline: warmup_ratio = 0.03)")
    schedule: str = hparam("cosine", source=f"{BASELINE} baseline: lr_scheduler_type = \"cosine\")")


def apply(model: nn.Module, config: FullConfig, context: ApplyContext) -> None:
    """Everything trains."""
    from inca.adapters.common import set_trainable

    set_trainable(model, model.parameters())


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """Every parameter (backbone and head); buffers are not trained and come from the backbone on load."""
    from inca.adapters.common import named_tensors, write_adapter

    write_adapter(directory, {"method": "full"}, named_tensors(model, model.parameters()))


def load(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a saved full fine-tuning onto a copy of its backbone with the same ``num_classes`` head."""
    from inca.adapters.common import load_tensors, named_tensors, read_adapter, set_trainable

    _, tensors = read_adapter(directory, "full")
    load_tensors(model, tensors, named_tensors(model, model.parameters()))
    set_trainable(model, model.parameters())


register_method(
    "full", FullConfig, "full fine-tuning: every parameter of the backbone and the head trains",
    apply=apply, save=save, load=load,
)  # fmt: skip
