"""``linear``: a linear probe, the new head trained on pooled features of the frozen backbone (computed once)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inca import options as opt
from inca.methods.base import ApplyContext, TrainConfig, hparam
from inca.methods.registry import register_method
from inca.options import POOLS
from inca.train.config import TIMM_SCHEDULE

if TYPE_CHECKING:
    from torch import nn

OURS = "ours: no paper's setting applies to this probe"


@dataclass(frozen=True, kw_only=True)
class LinearConfig(TrainConfig):
    """The linear probe's hyper-parameters, and which pooled features its head reads (also the head that
    ``--head-init linear-probe`` starts the other end-to-end methods from)."""

    lr: float = hparam(1e-2, source=f"{OURS}; a head on fixed features takes larger steps than fine-tuning "
                                    "(1e-3 left it under-fitted after 5 epochs on the proxy backbone)")
    weight_decay: float = hparam(0.0, source=OURS)
    schedule: str = hparam("cosine", source=f"{OURS}; cosine, {TIMM_SCHEDULE}")
    pool: str = hparam(
        "auto", help="the head's input: the backbone's own pooling (auto: timm's global_pool, the class token of "
                     "most ViTs), the class token (cls) or the mean of the patch tokens (mean)",
        source=OURS, check=opt.choice("auto", *POOLS),
    )  # fmt: skip

    @property
    def head_pool(self) -> str | None:
        return None if self.pool == "auto" else self.pool


def apply(model: nn.Module, config: LinearConfig, context: ApplyContext) -> None:
    """Only the head trains."""
    from inca.adapters.common import head_parameters, set_trainable

    set_trainable(model, head_parameters(model))


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """The head and the pooling it reads (timm's ``global_pool``)."""
    from inca.adapters.common import head_parameters, named_tensors, write_adapter

    pool = getattr(model, "global_pool", None)
    config = {"method": "linear", "global_pool": pool if isinstance(pool, str) else None}
    write_adapter(directory, config, named_tensors(model, head_parameters(model)))


def load(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a saved probe onto a copy of its backbone with a ``num_classes`` head (its pooling is restored)."""
    from inca.adapters.common import (
        classifier_modules,
        head_parameters,
        load_tensors,
        named_tensors,
        read_adapter,
        set_trainable,
    )

    config, tensors = read_adapter(directory, "linear")
    pool = config["global_pool"]
    if pool is not None and getattr(model, "global_pool", None) != pool:
        reference = next(model.parameters())
        model.reset_classifier(model.num_classes, global_pool=pool)
        for head in classifier_modules(model):
            head.to(reference.device, reference.dtype)
    load_tensors(model, tensors, named_tensors(model, head_parameters(model)))
    set_trainable(model, head_parameters(model))


register_method(
    "linear", LinearConfig, "linear probe: only a new head, trained on the frozen backbone's pooled features "
    "(computed once)", apply=apply, save=save, load=load, features_only=True,
)  # fmt: skip
