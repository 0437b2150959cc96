"""Training an :class:`~inca.adapters.inca.InCABank` on activations, wherever they come from.

The trainer owns the batch order: each epoch is a permutation drawn from ``numpy``'s generator seeded
by ``(seed, epoch)``, cut into batches whose indices are sorted (sequential memmap gathers), so a cache
source and a live-backbone source see identical batches and a resumed run continues exactly where the
interrupted one stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from inca.activations import ActivationSource
from inca.adapters.inca import InCABank
from inca.devices import autocast
from inca.errors import InCAError
from inca.io import atomic_write
from inca.train.optim import BatchedAdamW, cosine_schedule

__all__ = [
    "BankHistory",
    "epoch_batches",
    "evaluate_bank",
    "evaluate_ensemble",
    "per_adapter_loss",
    "select_best",
    "top_adapters",
    "train_bank",
]

logger = logging.getLogger(__name__)


def epoch_batches(num_rows: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: a permutation seeded by ``(seed, epoch)``, cut, each cut sorted."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return [np.sort(perm[i : i + batch_size]) for i in range(0, num_rows, batch_size)]


def per_adapter_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each adapter: ``logits [E, B, C]``, ``labels [B]`` -> ``[E]``."""
    e, b, c = logits.shape
    return F.cross_entropy(logits.reshape(e * b, c), labels.repeat(e), reduction="none").view(e, b).mean(1)


@dataclass
class BankHistory:
    """Per epoch, one value per adapter (NaN once an adapter has diverged)."""

    train_loss: list[list[float]] = field(default_factory=list)
    val_accuracy: list[list[float]] = field(default_factory=list)  # filled when train_bank gets eval_split
    diverged: list[bool] = field(default_factory=list)


def _check_source(bank: InCABank, source: ActivationSource, split: str) -> int:
    missing = sorted(set(bank.layers) - set(source.layers))
    if missing:
        raise InCAError(f"the activation source lacks layers {missing} that the bank reads; add them to it")
    n = source.num_rows(split)
    if n == 0:
        raise InCAError(f"split {split!r} of the activation source is empty; it needs at least one example")
    labels = source.labels(split)
    if labels.min() < 0 or labels.max() >= bank.num_classes:
        raise InCAError(f"split {split!r} has labels outside 0..{bank.num_classes - 1}; check the task's classes")
    return n


def train_bank(
    bank: InCABank,
    source: ActivationSource,
    *,
    epochs: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    seed: int = 0,
    warmup_ratio: float = 0.1,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    eval_split: str | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> BankHistory:
    """Train every adapter of ``bank`` on the ``train`` split: one forward, one backward (the sum of the
    adapters' mean cross-entropies, so each gets its own gradient) and one :class:`BatchedAdamW` step per
    batch, learning rates from the specs times a cosine schedule with linear warm-up (``warmup_steps``,
    else ``warmup_ratio`` of all steps). bf16 autocast on CUDA.

    An adapter whose loss goes non-finite is marked in ``bank.diverged`` and frozen from then on; the
    others go on unchanged. With ``checkpoint_path`` the bank, optimizer state and history are saved
    atomically after each epoch, and a run finding its checkpoint resumes from it (same result as an
    uninterrupted run). With ``eval_split`` each epoch ends with an accuracy on that split.
    """
    if epochs < 1 or batch_size < 1:
        raise InCAError(f"epochs ({epochs}) and batch_size ({batch_size}) must be positive")
    device = torch.device(device)
    n = _check_source(bank, source, "train")
    bank.to(device)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = round(warmup_ratio * total) if warmup_steps is None else warmup_steps
    schedule = cosine_schedule(total, warmup, min_lr_ratio)
    optimizer = BatchedAdamW(bank.optimizer_groups())
    config = {  # JSON round-tripped below, to compare with a checkpoint's
        "specs": [asdict(s) for s in bank.specs],
        "dim": bank.dim,
        "num_classes": bank.num_classes,
        "train_rows": n,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "warmup_steps": warmup,
        "min_lr_ratio": min_lr_ratio,
        "eval_split": eval_split,
    }
    config = json.loads(json.dumps(config))
    history, start = BankHistory(), 0
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        start, history = _load_checkpoint(Path(checkpoint_path), bank, optimizer, config)
        logger.info("resuming bank training from %s after epoch %d/%d", checkpoint_path, start, epochs)
    frozen = bank.diverged.tolist()
    bar = tqdm(total=total, initial=start * steps_per_epoch, disable=not progress, desc="InCA bank", unit="step")
    step = start * steps_per_epoch
    for epoch in range(start, epochs):
        loss_sum = torch.zeros(len(bank), device=device)
        for features, labels in source.loader("train", epoch_batches(n, batch_size, seed, epoch)):
            features = {layer: features[layer].to(device, non_blocking=True) for layer in bank.layers}
            labels = labels.to(device, non_blocking=True)
            with autocast(device):
                logits = bank(features)
            losses = per_adapter_loss(logits.float(), labels)
            bad = ~torch.isfinite(losses) & ~bank.diverged
            if bad.any():
                bank.diverged |= bad
                frozen = bank.diverged.tolist()
                logger.warning(
                    "adapters %s diverged (non-finite loss) at epoch %d step %d: frozen, the others go on",
                    bad.nonzero().flatten().tolist(), epoch + 1, step,
                )  # fmt: skip
            losses = losses.masked_fill(bank.diverged, 0.0)
            losses.sum().backward()
            optimizer.step(schedule(step), frozen=frozen)
            optimizer.zero_grad(set_to_none=False)
            loss_sum += losses.detach()
            step += 1
            bar.update()
        epoch_loss = (loss_sum / steps_per_epoch).masked_fill(bank.diverged, math.nan).tolist()
        history.train_loss.append(epoch_loss)
        message = f"epoch {epoch + 1}/{epochs}: best train loss {_nanmin(epoch_loss):.4f}"
        if eval_split is not None:
            history.val_accuracy.append(evaluate_bank(bank, source, eval_split, batch_size).tolist())
            message += f", best {eval_split} accuracy {_nanmax(history.val_accuracy[-1]):.4f}"
        bar.set_postfix_str(message.split(": ", 1)[1])
        logger.info(message + f", {sum(frozen)}/{len(bank)} diverged")
        history.diverged = bank.diverged.tolist()
        if checkpoint_path is not None:
            _save_checkpoint(Path(checkpoint_path), bank, optimizer, config, epoch + 1, history)
    bar.close()
    history.diverged = bank.diverged.tolist()
    return history


def _nanmin(values: list[float]) -> float:
    return min((v for v in values if not math.isnan(v)), default=math.nan)


def _nanmax(values: list[float]) -> float:
    return max((v for v in values if not math.isnan(v)), default=math.nan)


def _eval_logits(
    bank: InCABank, source: ActivationSource, split: str, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(logits [E, B, C], labels [B])`` over ``split`` in order, on the bank's device, inference mode."""
    n = _check_source(bank, source, split)
    device = bank.diverged.device
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    with torch.inference_mode(), autocast(device):
        for features, labels in source.loader(split, batches):
            yield bank({layer: features[layer].to(device) for layer in bank.layers}), labels.to(device)


def evaluate_bank(bank: InCABank, source: ActivationSource, split: str, batch_size: int = 256) -> Tensor:
    """Accuracy of every adapter on ``split`` (on the bank's device): a CPU float tensor ``[E]``, NaN for
    diverged adapters."""
    correct = torch.zeros(len(bank), dtype=torch.long, device=bank.diverged.device)
    for logits, labels in _eval_logits(bank, source, split, batch_size):
        correct += (logits.argmax(-1) == labels).sum(1)
    return (correct.double() / source.num_rows(split)).float().masked_fill(bank.diverged, math.nan).cpu()


def evaluate_ensemble(
    bank: InCABank, source: ActivationSource, members: Sequence[int], split: str, batch_size: int = 256
) -> float:
    """Accuracy on ``split`` of the parallel ensemble of adapters ``members``: the argmax of their mean
    class probabilities (what :class:`~inca.adapters.saved.TaskAdapter` serves for them)."""
    index = torch.tensor(list(members), device=bank.diverged.device)
    correct = 0
    for logits, labels in _eval_logits(bank, source, split, batch_size):
        probabilities = logits.index_select(0, index).float().softmax(-1).mean(0)
        correct += int((probabilities.argmax(-1) == labels).sum())
    return correct / source.num_rows(split)


def top_adapters(accuracy: Tensor, k: int) -> list[int]:
    """The ``k`` adapters with the best ``accuracy`` (NaN, diverged, excluded), best first; ties to the earliest."""
    ranked = sorted((i for i, a in enumerate(accuracy.tolist()) if a == a), key=lambda i: (-accuracy[i].item(), i))
    return ranked[:k]


def select_best(
    bank: InCABank, source: ActivationSource, split: str = "val", batch_size: int = 256
) -> tuple[int, Tensor]:
    """Index of the adapter with the best accuracy on ``split`` (a validation split: never ``test``),
    diverged adapters excluded, and all the accuracies. Ties go to the earliest spec."""
    if split == "test":
        raise InCAError("selecting adapters on the test split leaks it into the result; select on 'val'")
    if bank.diverged.all():
        raise InCAError(f"all {len(bank)} adapters diverged; lower the learning rates and train again")
    accuracy = evaluate_bank(bank, source, split, batch_size)
    return top_adapters(accuracy, 1)[0], accuracy


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file, bank and optimizer tensors, run config and history as metadata.
# ----------------------------------------------------------------------------------------------------


def _save_checkpoint(
    path: Path, bank: InCABank, optimizer: BatchedAdamW, config: dict, epoch: int, history: BankHistory
) -> None:
    tensors = {f"bank.{k}": v for k, v in bank.state_dict().items()}
    tensors.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"epoch": str(epoch), "config": json.dumps(config), "history": json.dumps(asdict(history))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _load_checkpoint(path: Path, bank: InCABank, optimizer: BatchedAdamW, config: dict) -> tuple[int, BankHistory]:
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    if "config" not in metadata:
        raise InCAError(f"{path} is not a bank training checkpoint; delete it or pass another checkpoint path")
    saved = json.loads(metadata["config"])
    if saved != config:
        differ = sorted(k for k in config if saved.get(k) != config[k])
        raise InCAError(
            f"checkpoint {path} is from a different run (differs in {differ}); delete it or use another path"
        )
    bank.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("bank.")})
    optimizer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")})
    return int(metadata["epoch"]), BankHistory(**json.loads(metadata["history"]))
