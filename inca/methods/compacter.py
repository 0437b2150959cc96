"""``compacter`` and ``compacter++``: Compacter adapters (Mahabadi et al., 2021) in every block, trained with
the LayerNorms and the head. The two differ only in ``plus`` (adapters after the MLP only)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inca.methods.base import HF_SCHEDULE, HF_TRAINER, ApplyContext, TrainConfig, hparam
from inca.methods.registry import register_method
from inca.registry import lazy

if TYPE_CHECKING:
    from torch import nn

PAPER = "Mahabadi et al. 2021, Section 4"
CONFIG = "rabeehk/compacter, seq2seq/configs/compacter.json"


@dataclass(frozen=True, kw_only=True)
class CompacterConfig(TrainConfig):
    """Compacter's hyper-parameters, as the paper's GLUE experiments and the authors' configs set them."""

    lr: float = hparam(3e-3, source=f"{PAPER} (3e-3 for every adapter method); {CONFIG} (learning_rate: 3e-3)")
    weight_decay: float = hparam(0.0, source=f"{CONFIG} sets none: HF TrainingArguments' default weight_decay=0.0")
    warmup_ratio: float = hparam(0.1, source=f"ours: one value for every end-to-end method ({CONFIG} warms up "
                                             "500 steps, warmup_steps: 500)")
    max_grad_norm: float = hparam(1.0, source=f"{CONFIG} sets none: {HF_TRAINER}")
    schedule: str = hparam("linear", source=f"{CONFIG} sets no lr_scheduler_type, and the authors' Seq2SeqTrainer "
                                            "(seq2seq/third_party/trainers/seq2seq_trainer.py) keeps HF Trainer's "
                                            f"scheduler: {HF_SCHEDULE}")
    phm_dim: int = hparam(4, help="n, the number of Kronecker products (divides the width and the bottleneck)",
                          source=f"{PAPER}; {CONFIG} (hypercomplex_division: 4)")
    rank: int = hparam(1, help="rank of each factorised B_i = s_i t_i^T", source=f"{PAPER} (LPHM rank 1)")
    reduction: int = hparam(32, help="bottleneck = width // reduction, rounded up to a multiple of phm_dim",
                            source=f"{PAPER}; {CONFIG} (task_reduction_factor: 32)")
    reduction_grid: list[int] = hparam(
        [32, 16, 8], help="reductions tried with every learning rate when inca-compare --lr-grid tunes (> 1)",
        source=f"{PAPER} (the reduction factor is tuned over 32, 16 and 8)",
    )  # fmt: skip
    train_norms: bool = hparam(True, help="train the LayerNorms too",
                               source=f"{PAPER}; {CONFIG} (unfreeze_layer_norms: true)")
    plus: bool = hparam(False, help="adapters after the MLP only (Compacter++) instead of after attention and MLP",
                        source=f"{PAPER} (Compacter)")

    def tuning_grid(self, size: int) -> list[TrainConfig]:
        """Learning rates x ``reduction_grid`` (this config first), as the authors tune both; ``size`` 1 tunes
        nothing."""
        if size == 1:
            return [self]
        reductions = [self.reduction] + [r for r in self.reduction_grid if r != self.reduction]
        rates = super().tuning_grid(size)
        return [dataclasses.replace(config, reduction=r) for r in reductions for config in rates]


@dataclass(frozen=True, kw_only=True)
class CompacterPlusConfig(CompacterConfig):
    """Compacter++: Compacter with adapters after the MLP only."""

    plus: bool = hparam(True, source=f"{PAPER} (Compacter++); rabeehk/compacter, seq2seq/configs/compacter++.json "
                                 "(add_adapter_in_self_attention: false)")


def apply(model: nn.Module, config: CompacterConfig, context: ApplyContext) -> None:
    """Wrap the blocks' sub-layers with adapters sharing one rule tensor; adapters, norms and head train."""
    from inca.adapters.compacter import apply_compacter

    apply_compacter(model, config.phm_dim, config.rank, config.reduction, config.plus, config.train_norms)


SAVE, LOAD = lazy("inca.adapters.compacter:save_compacter"), lazy("inca.adapters.compacter:load_compacter")
register_method(
    "compacter", CompacterConfig, "Compacter (Mahabadi et al., 2021): bottleneck adapters of low-rank "
    "hypercomplex (LPHM) layers after each block's attention and MLP", apply=apply, save=SAVE, load=LOAD,
)  # fmt: skip
register_method(
    "compacter++", CompacterPlusConfig, "Compacter++ (Mahabadi et al., 2021): Compacter after each block's MLP "
    "only", apply=apply, save=SAVE, load=LOAD,
)  # fmt: skip
