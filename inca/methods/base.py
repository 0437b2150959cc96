"""What every method's hyper-parameters are made of: a typed :class:`~inca.config.Config` whose
:func:`~inca.config.hparam` fields say what they do and where their default comes from.

``inca-compare --method-args lora.rank=4`` and a recipe's ``method_args: {lora: {rank: 4}}`` are coerced to
the field's type (``bool``, ``int``, ``float``, ``str``, ``list[...]`` of those) with a one-line
:class:`~inca.errors.InCAError` when they do not fit. This module imports no torch (``--help`` lists every
method's hyper-parameters without it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inca.config import Config, hparam, type_name
from inca.errors import InCAError, require_positive

if TYPE_CHECKING:
    import torch

    from inca.activations import DataSource

__all__ = ["HEAD_INITS", "PEFT_DIR", "ApplyContext", "MethodConfig", "RunConfig", "TrainConfig", "hparam",
           "lr_candidates", "type_name"]

HEAD_INITS = ("linear-probe", "random", "zero")
LR_STEP = 3.0  # --lr-grid: neighbouring learning rates are this factor apart (inca's own choice: half a decade)
HF_TRAINER = "HF TrainingArguments' default max_grad_norm=1.0"
PEFT_DIR = "peft"  # under a run's work_dir: the PEFT export of a LoRA-type model (RunConfig.export_peft)


@dataclass(frozen=True, kw_only=True)
class MethodConfig(Config):
    """Base of every method's hyper-parameters (a frozen, keyword-only dataclass of :func:`hparam` fields)."""


def lr_candidates(lr: float, size: int) -> list[float]:
    """``size`` learning rates :data:`LR_STEP` apart around ``lr``, ``lr`` first (ties in a tuning keep it),
    then the others from the lowest: ``3 -> [lr, lr/3, 3 lr]``, ``4 -> [lr, lr/3, 3 lr, 9 lr]``."""
    if size < 1:
        raise InCAError(f"--lr-grid must be at least 1 (1: no tuning), got {size}")
    offsets = [i - (size - 1) // 2 for i in range(size)]
    return [lr] + [float(f"{lr * LR_STEP**k:.6g}") for k in offsets if k != 0]


@dataclass(frozen=True, kw_only=True)
class TrainConfig(MethodConfig):
    """Hyper-parameters of a method trained by the shared end-to-end loop (:func:`inca.train.e2e.fit`):
    AdamW with timm's weight-decay groups, cosine schedule after a linear warm-up, gradient-norm clipping."""

    lr: float = hparam(help="peak learning rate of AdamW")
    weight_decay: float = hparam(
        0.01, help="AdamW weight decay (not on biases, norms and tokens: timm's groups)",
        source="ours: one value for every end-to-end method",
    )  # fmt: skip
    warmup_ratio: float = hparam(
        0.1, help="fraction of all steps that warm the learning rate up linearly, before the cosine decay",
        source="ours: one value for every end-to-end method",
    )  # fmt: skip
    max_grad_norm: float = hparam(
        1.0, help="clip the gradient's global L2 norm to this before each step (0: off)",
        source=f"{HF_TRAINER}, kept by the LoRA, LoRA-GA and Compacter authors' trainers",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.max_grad_norm < 0:
            raise InCAError(f"max_grad_norm must be 0 (no clipping) or positive, got {self.max_grad_norm}")

    @property
    def head_pool(self) -> str | None:
        """Pooling of the new head's input (``cls`` | ``mean``); None keeps the backbone's own."""
        return None

    def tuning_grid(self, size: int) -> list[TrainConfig]:
        """The configs ``inca-compare --lr-grid size`` trains, this one first: its learning rate and
        ``size - 1`` neighbours (:func:`lr_candidates`). A method whose authors tune more overrides this."""
        return [dataclasses.replace(self, lr=lr) for lr in lr_candidates(self.lr, size)]


@dataclass(frozen=True)
class RunConfig:
    """What every method of a comparison shares: epochs, batch size (train and eval), seed, and the protocol:

    * ``head_init``: how the new head of a method that trains more than the head starts (``linear-probe``:
      fitted on the frozen features first, as linear-probe-then-fine-tune, Kumar et al. 2022; ``random``:
      timm's draw; ``zero``). A zero head sends no gradient to the backbone at step 0 (LoRA-GA's gradient is
      then zero), and a random one aligns LoRA-GA's factors with a random readout, not with the task.
    * ``augment``: timm's training augmentation on the train split of every method that trains on images.
    * ``lr_grid``: each method's learning rate is tuned over this many values around its default
      (:func:`lr_candidates`), selected on validation; 1 keeps the default.

    ``export_peft``: LoRA-type runs also write a PEFT adapter.
    """

    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    num_workers: int | None = None
    progress: bool = True
    export_peft: bool = False
    head_init: str = "linear-probe"
    augment: bool = False
    lr_grid: int = 1

    def __post_init__(self) -> None:
        require_positive(epochs=self.epochs, batch_size=self.batch_size)
        if self.head_init not in HEAD_INITS:
            raise InCAError(f"--head-init {self.head_init!r} is not one of {', '.join(HEAD_INITS)}")
        lr_candidates(1.0, self.lr_grid)  # checks the size

    def protocol(self) -> dict[str, Any]:
        """What ``compare.json`` records of the protocol (and a rerun must match)."""
        return {"head_init": self.head_init, "augment": self.augment, "lr_grid": self.lr_grid}


@dataclass(frozen=True)
class ApplyContext:
    """What a method's ``apply`` may need beyond its config (LoRA-GA: the first training batches)."""

    data: DataSource
    batch_size: int
    seed: int
    device: torch.device

    def train_batches(self, count: int) -> Iterator:
        """The first ``count`` batches of epoch 1, in the order training will see them (data-parallel: this
        rank's shards of the global batches)."""
        from inca.distributed import current
        from inca.train.bank import epoch_batches

        world = current()
        order = epoch_batches(self.data.num_rows("train"), self.batch_size * world.size, self.seed, 0)
        return iter(self.data.loader("train", [world.shard(batch) for batch in order[:count]]))
