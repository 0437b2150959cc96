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
from typing import TYPE_CHECKING, Any, ClassVar

from inca import options as opt
from inca.config import Config, hparam, type_name
from inca.errors import InCAError
from inca.train.config import SCHEDULE_HELP, SCHEDULES, TIMM_SCHEDULE

if TYPE_CHECKING:
    import torch

    from inca.activations import DataSource

__all__ = ["HEAD_INITS", "HF_SCHEDULE", "LR_STEP", "PEFT_DIR", "ApplyContext", "MethodConfig", "RunConfig",
           "TrainConfig", "hparam", "lr_candidates", "type_name"]

HEAD_INITS = ("linear-probe", "random", "zero")
LR_STEP = 3.0  # --lr-grid: neighbouring learning rates are this factor apart (inca's own choice: half a decade)
HF_TRAINER = "HF TrainingArguments' default max_grad_norm=1.0"
HF_SCHEDULE = "HF TrainingArguments' default lr_scheduler_type='linear' (get_linear_schedule_with_warmup)"
PEFT_DIR = "peft"  # under a run's work_dir: the PEFT export of a LoRA-type model (RunConfig.export_peft)
OWN = "inca's own choice"


@dataclass(frozen=True, kw_only=True)
class MethodConfig(Config):
    """Base of every method's hyper-parameters (a frozen, keyword-only dataclass of :func:`hparam` fields)."""

    FIELD_KIND: ClassVar[str] = "hyper-parameter"


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
    AdamW with timm's weight-decay groups, a linear warm-up then a cosine, linear or constant schedule,
    gradient-norm clipping."""

    lr: float = hparam(help="peak learning rate of AdamW")
    weight_decay: float = hparam(
        0.01, help="AdamW weight decay (not on biases, norms and tokens: timm's groups)",
        source="ours: one value for every end-to-end method",
    )  # fmt: skip
    warmup_ratio: float = hparam(
        0.1, help="fraction of all steps that warm the learning rate up linearly, before the schedule's decay",
        source="ours: one value for every end-to-end method",
    )  # fmt: skip
    schedule: str = hparam("cosine", help=SCHEDULE_HELP, check=opt.choice(*SCHEDULES),
                           source=f"{OWN}: cosine, {TIMM_SCHEDULE}")
    max_grad_norm: float = hparam(
        1.0, help="clip the gradient's global L2 norm to this before each step (0: off)",
        source=f"{HF_TRAINER}, kept by the LoRA, LoRA-GA and Compacter authors' trainers", check=opt.non_negative_float,
    )  # fmt: skip

    @property
    def head_pool(self) -> str | None:
        """Pooling of the new head's input (``cls`` | ``mean``); None keeps the backbone's own."""
        return None

    def tuning_grid(self, size: int) -> list[TrainConfig]:
        """The configs ``inca-compare --lr-grid size`` trains, this one first: its learning rate and
        ``size - 1`` neighbours (:func:`lr_candidates`). A method whose authors tune more overrides this."""
        return [dataclasses.replace(self, lr=lr) for lr in lr_candidates(self.lr, size)]


@dataclass(frozen=True, kw_only=True)
class RunConfig(Config):
    """What every method of a comparison shares: epochs, batch size (train and eval), seed, and the protocol
    (:attr:`PROTOCOL`: recorded in ``compare.json``, and a rerun must match it):

    * ``head_init``: how the new head of a method that trains more than the head starts (``linear-probe``:
      fitted on the frozen features first, as linear-probe-then-fine-tune, Kumar et al. 2022; ``random``:
      timm's draw; ``zero``). A zero head sends no gradient to the backbone at step 0 (LoRA-GA's gradient is
      then zero), and a random one aligns LoRA-GA's factors with a random readout, not with the task.
    * ``augment``: timm's training augmentation on the train split of every method that trains on images.
    * ``lr_grid``: each method's learning rate is tuned over this many values around its default
      (:func:`lr_candidates`), selected on validation; 1 keeps the default.

    ``export_peft``: LoRA-type runs also write a PEFT adapter. ``inca-compare``'s flags are generated from these
    fields (``num_workers`` is the data group's ``--num-workers``; ``progress`` follows ``--quiet``).
    """

    PROTOCOL: ClassVar[tuple[str, ...]] = ("head_init", "augment", "lr_grid")

    epochs: int = hparam(10, help="epochs for every method", check=opt.positive_int,
                         source=f"{OWN}: a short schedule, the same for every method; each reports its best "
                                "validation epoch, so more epochs cost time rather than a worse pick")
    batch_size: int = hparam(opt.BATCH_SIZE, help="batch size for every method (training and evaluation)",
                             check=opt.positive_int,
                             source=f"{OWN}: every command's batch size (inca.options.BATCH_SIZE), one for every "
                                    "method so that all see the same batches in the same order")
    seed: int = hparam(0, help="seed of heads, adapters and batch order", check=opt.seed,
                       source=f"{OWN}: any fixed seed makes a rerun reproducible; one for every method, so all "
                              "start from the same head and batch order")
    num_workers: int | None = hparam(None, help="image decoding workers (None: auto)",
                                     source=f"{OWN}: in-memory tasks decode in the main process, others in up to "
                                            "8 workers (inca.tasks.image_loader)")
    progress: bool = hparam(True, help="report each run's progress",
                            source=f"{OWN}: every inca loop reports its progress (--quiet silences a whole command)")
    export_peft: bool = hparam(
        False, help=f"also write each trained model of a method with a PEFT export (the LoRA types) as a PEFT LoRA "
                    f"adapter, to OUT/runs/<task>-<hash>/<method>/{PEFT_DIR}/ (pairs a rerun skips are not "
                    "re-exported)",
        source=f"{OWN}: inca's own format is always written (inca-predict serves it); the PEFT copy on request",
    )  # fmt: skip
    head_init: str = hparam(
        "linear-probe", check=opt.choice(*HEAD_INITS),
        help="how the new head of the end-to-end methods starts: fitted on frozen features first "
             "(linear-probe-then-fine-tune), timm's random draw, or zeros (then no gradient reaches the backbone at "
             "step 0 and LoRA-GA has nothing to approximate)",
        source="Kumar et al., \"Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution\", "
               "ICLR 2022: linear probing, then fine-tuning (LP-FT)",
    )  # fmt: skip
    augment: bool = hparam(
        False, help="timm's training augmentation (create_transform(is_training=True)) on the train split of every "
                    "method that sees images; InCA then streams live activations",
        source=f"{OWN}: off, so InCA reads activations computed once (augmented views must be streamed live)",
    )  # fmt: skip
    lr_grid: int = hparam(
        1, check=opt.positive_int,
        help=f"tune each method's learning rate over this many values x{LR_STEP:g} apart around the method's own, "
             "selected on val (a method whose authors tune more, such as Compacter's reduction factor, over that "
             "too); 1: no tuning",
        source=f"{OWN}: each method at its authors' learning rate; more values tune every method alike",
    )  # fmt: skip

    def protocol(self) -> dict[str, Any]:
        """What ``compare.json`` records of the protocol (and a rerun must match)."""
        return {key: getattr(self, key) for key in self.PROTOCOL}


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
