"""End-to-end training through the backbone: the one loop every comparison method trains with.

Full fine-tuning, LoRA, LoRA-GA, Compacter and the linear probe differ only in which model they hand
:func:`fit`, which of its parameters require grad and their hyper-parameters; the loop (AdamW with timm's
weight-decay groups, a linear warm-up then each method's schedule, gradient-norm clipping, bf16 autocast on
CUDA, per-step loss, validation every epoch, best-by-validation state evaluated once on test) is shared, so
their numbers are comparable.

Batch order comes from :func:`inca.train.bank.epoch_batches` (a permutation seeded by ``(seed, epoch)``),
the same order an InCA bank sees, so every method visits the same batches for a given seed.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from inca.activations import DataSource, TensorBatches
from inca.backbone import Backbone
from inca.devices import autocast
from inca.distributed import current
from inca.errors import InCAError, first_line, require_positive
from inca.options import BATCH_SIZE, POOLS
from inca.progress import progress
from inca.tasks import sequential_batches
from inca.train.bank import epoch_batches
from inca.train.optim import fused_adamw, lr_schedule
from inca.training_log import TrainingLog

__all__ = [
    "FitConfig",
    "FitResult",
    "batch_loss",
    "evaluate",
    "fit",
    "pooled_features",
    "trainable_copy",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """Optimisation of one end-to-end run. ``warmup_ratio`` of all steps warm up linearly, then ``schedule``
    (:func:`~inca.train.optim.lr_schedule`: cosine or linear to 0, or constant); the gradient's global L2 norm
    is clipped to ``max_grad_norm`` (0: no clipping) before each step.

    The defaults serve direct library use (inca's own choice: common AdamW fine-tuning values); every method
    passes its own config's values, each with its source (:mod:`inca.methods`)."""

    epochs: int = 10
    batch_size: int = BATCH_SIZE
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    max_grad_norm: float = 1.0
    schedule: str = "cosine"


@dataclass
class FitResult:
    """Accuracies at the best validation epoch (1-based ``best_epoch``); the validation accuracy of every epoch, the
    loss of every step and each epoch's mean loss (None for an epoch whose first step diverged)."""

    test_acc: float
    val_acc: float
    best_epoch: int
    val_curve: list[float]
    loss_curve: list[float]
    steps: int
    diverged_at_step: int | None = None
    epoch_loss: list[float | None] = field(default_factory=list)


def batch_loss(model: nn.Module, batch: tuple[Tensor, Tensor], device: torch.device) -> Tensor:
    """Mean cross-entropy of one ``(inputs, labels)`` batch (also LoRA-GA's gradient-estimate loss)."""
    inputs, labels = batch
    with autocast(device):
        logits = model(inputs.to(device, non_blocking=True))
    return F.cross_entropy(logits.float(), labels.to(device, non_blocking=True))


def trainable_copy(backbone: Backbone, num_classes: int, pool: str | None = None) -> nn.Module:
    """A deep copy of the frozen backbone's timm model with a new ``num_classes`` head, all frozen.

    The head is drawn from torch's global RNG (seed it for reproducibility). ``pool`` (``cls`` or
    ``mean`` of the patch tokens) changes timm's ``global_pool``; by default the model's own is kept.
    """
    model = copy.deepcopy(backbone.model)
    if pool is None:
        model.reset_classifier(num_classes)
    else:
        if pool not in POOLS:
            raise InCAError(f"pooling {pool!r} is unknown; use one of {', '.join(POOLS)}")
        if pool == "cls" and getattr(model, "cls_token", None) is None:
            raise InCAError(f"backbone {backbone.name!r} has no class token; pool the tokens with pool=mean")
        try:
            model.reset_classifier(num_classes, global_pool=POOLS[pool])
        except (AssertionError, ValueError, TypeError) as exc:  # e.g. a distilled DeiT's head reads fixed tokens
            raise InCAError(f"backbone {backbone.name!r} cannot pool its head's input as {pool} "
                            f"({first_line(exc)}); use its own pooling (pool=auto)") from None
    return model.to(backbone.device).requires_grad_(False)


@torch.inference_mode()
def pooled_features(model: nn.Module, data: DataSource, batch_size: int, splits: Iterable[str]) -> TensorBatches:
    """Each split's pre-logit features (timm's ``forward_head(pre_logits=True)``: pooled and normed), fp32 CPU."""
    device = next(model.parameters()).device
    model.eval()
    inputs, labels = {}, {}
    for split in splits:
        feats, ys = [], []
        for images, y in data.loader(split, sequential_batches(0, data.num_rows(split), batch_size)):
            with autocast(device):
                tokens = model.forward_features(images.to(device, non_blocking=True))
                feats.append(model.forward_head(tokens, pre_logits=True).float().cpu())
            ys.append(y)
        inputs[split], labels[split] = torch.cat(feats), torch.cat(ys)
    return TensorBatches(inputs, labels)


@torch.inference_mode()
def evaluate(model: nn.Module, data: DataSource, split: str, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (eval mode, autocast as in training)."""
    device = next(model.parameters()).device
    model.eval()
    correct, n = torch.zeros((), dtype=torch.long, device=device), data.num_rows(split)
    for inputs, labels in data.loader(split, current().shard_batches(n, batch_size)):  # each rank counts its part
        with autocast(device):
            logits = model(inputs.to(device, non_blocking=True))
        correct += (logits.argmax(-1) == labels.to(device, non_blocking=True)).sum()
    return current().all_reduce_(correct).item() / n


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of the parameters being trained: the best-epoch checkpoint, kept in memory."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def fit(model: nn.Module, data: DataSource, config: FitConfig, log: TrainingLog | None = None) -> FitResult:
    """Train the parameters of ``model`` that require grad on ``train``; validate each epoch; test the best.

    The validation-best trainable state is restored before the single test evaluation (selection never
    sees test). A non-finite loss stops training (the step is not applied) and is reported as
    ``diverged_at_step``; the epoch's validation still runs, so the best finite state is kept. With ``log`` each
    epoch's mean loss, validation accuracy and learning rate go to TensorBoard as it ends.
    """
    require_positive(epochs=config.epochs, batch_size=config.batch_size)
    if config.max_grad_norm < 0:
        raise InCAError(f"max_grad_norm must be 0 (no clipping) or positive, got {config.max_grad_norm}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InCAError(f"{config.desc}: nothing to train (no parameter requires grad)")
    world = current()  # data-parallel: config.batch_size per rank, each rank its shard of the global batch
    world.broadcast_parameters([*model.parameters(), *model.buffers()])  # replicas start as rank 0's
    batch_size = config.batch_size * world.size
    total = config.epochs * math.ceil(data.num_rows("train") / batch_size)
    optimizer, schedule = _optimisation(model, params, config, total)
    losses: list[Tensor] = []
    val_curve: list[float] = []
    epoch_loss: list[float | None] = []
    best_acc, best_epoch, best_state, diverged_at = -1.0, 0, None, None
    bar = progress(total=total, desc=config.desc, unit="step", enabled=config.progress)
    for epoch in range(config.epochs):
        done = len(losses)
        diverged_at = _train_epoch(model, data, config, optimizer, schedule, params, batch_size, epoch, losses,
                                   on_step=bar.update)
        val_acc = evaluate(model, data, "val", config.batch_size)
        val_curve.append(val_acc)
        epoch_loss.append(torch.stack(losses[done:]).mean().item() if len(losses) > done else None)
        if log is not None:
            log.scalars(epoch + 1, {"train/loss": epoch_loss[-1], "val/accuracy": val_acc,
                                    "lr": optimizer.param_groups[0]["lr"]})
        if val_acc > best_acc:
            best_acc, best_epoch, best_state = val_acc, epoch + 1, _trainable_state(model)
        loss_text = f"loss {losses[-1].item():.4f}, " if losses else ""
        bar.set_postfix_str(f"{loss_text}val_acc {val_acc:.4f}")
        logger.debug("%s epoch %d/%d: val accuracy %.4f", config.desc, epoch + 1, config.epochs, val_acc)
        if diverged_at is not None:
            break
    bar.close()
    _restore_trainable_state(model, best_state)
    test_acc = evaluate(model, data, "test", config.batch_size)
    loss_curve = torch.stack(losses).float().cpu().tolist() if losses else []
    return FitResult(test_acc, best_acc, best_epoch, val_curve, loss_curve, len(losses), diverged_at, epoch_loss)


def _optimisation(
    model: nn.Module, params: list[nn.Parameter], config: FitConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over timm's weight-decay groups (the fused kernel where torch has it for the device), and its schedule:
    a linear warm-up over ``warmup_ratio`` of all steps, then ``config.schedule``."""
    no_decay = getattr(model, "no_weight_decay", lambda: ())()
    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=no_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=fused_adamw(params[0].device))
    warmup = round(config.warmup_ratio * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config.schedule, total_steps, warmup))


def _train_epoch(
    model: nn.Module, data: DataSource, config: FitConfig, optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR, params: list[nn.Parameter], batch_size: int, epoch: int,
    losses: list[Tensor], on_step: Callable[[], Any],
) -> int | None:  # fmt: skip
    """One epoch of steps over ``train`` in :func:`epoch_batches` order (``batch_size``: the global batch), each
    step's global loss appended to ``losses`` and reported to ``on_step``. Returns the step whose loss was not
    finite (not applied; training stops there), else None."""
    world, device = current(), params[0].device
    model.train()
    batches = epoch_batches(data.num_rows("train"), batch_size, config.seed, epoch)
    for batch, share in world.sharded(batches, functools.partial(data.loader, "train")):
        loss = torch.zeros((), device=device) if batch is None else batch_loss(model, batch, device)
        if share != 1.0:
            loss = loss * share  # this rank's part of the global batch's mean loss
        global_loss = world.all_reduce_(loss.detach().clone())
        if not torch.isfinite(global_loss):
            logger.warning("%s: loss is %s at step %d; training stops (lower the learning rate)",
                           config.desc, global_loss.item(), len(losses))
            return len(losses)
        optimizer.zero_grad(set_to_none=True)
        if batch is not None:
            loss.backward()
        world.all_reduce_gradients(params)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(global_loss)
        on_step()
    return None


def _restore_trainable_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a :func:`_trainable_state` back into ``model``'s parameters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name])
