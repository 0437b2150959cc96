"""Training an :class:`~inca.adapters.inca.InCABank` on activations, wherever they come from.

The trainer owns the batch order: each epoch is a permutation drawn from ``numpy``'s generator seeded
by ``(seed, epoch)``, cut into batches whose indices are sorted (sequential memmap gathers), so a cache
source and a live-backbone source see identical batches and a resumed run continues exactly where the
interrupted one stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from inca.activations import EVAL_BATCH_SIZE, ActivationSource, narrow_source
from inca.adapters.inca import AdapterSpec, InCABank
from inca.devices import autocast
from inca.distributed import current
from inca.errors import InCAError, first_line, require_positive
from inca.io import atomic_write
from inca.progress import progress as progress_bar
from inca.train.halving import SuccessiveHalving
from inca.train.optim import BatchedAdamW, lr_schedule
from inca.training_log import TrainingLog, adapter_names

__all__ = [
    "BankHistory",
    "BestEpochs",
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
    """Per epoch, one value per adapter (NaN once an adapter has diverged, or left the bank at a rung of
    successive halving); with an eval split, per adapter the 1-based epoch whose weights it ends with
    (``best_epoch``, 0: it never had a finite accuracy). Per adapter, the epochs it trained and the 1-based rung
    where successive halving stopped it (``stopped_rung``, None: it trained to the end); per rung, its epoch and
    how many adapters entered it and were kept (``rungs``)."""

    train_loss: list[list[float]] = field(default_factory=list)
    val_accuracy: list[list[float]] = field(default_factory=list)  # filled when train_bank gets eval_split
    diverged: list[bool] = field(default_factory=list)
    best_epoch: list[int] = field(default_factory=list)
    epochs_trained: list[int] = field(default_factory=list)
    stopped_rung: list[int | None] = field(default_factory=list)
    rungs: list[dict[str, int]] = field(default_factory=list)


class BestEpochs:
    """The epoch whose weights each adapter of a bank ends with: its best on the eval split so far, the model
    selection of the end-to-end methods. Each adapter's rows of the bank's stacked parameters are copied when
    its accuracy improves (strictly: ties keep the earlier epoch, as in :func:`inca.train.e2e.fit`). The
    bookkeeping replays from a history, so a checkpoint holds only the rows.

    :func:`train_bank` builds this module's ``BestEpochs``; a subclass overriding :meth:`improved` is another
    selection rule (``tools/ablate_fixes.py`` puts back the last epoch this way)."""

    def __init__(self, bank: InCABank) -> None:
        self.state = {name: p.detach().clone() for name, p in bank.named_parameters()}
        self.accuracy = [-math.inf] * len(bank)
        self.epoch = [0] * len(bank)
        prefix = {id(stack): f"stacks.{s}." for s, stack in enumerate(bank.stacks)}
        self._rows = []  # per adapter: (its stack's parameter prefix in the bank, row)
        for i in range(len(bank)):
            stack, row = bank.locate(i)
            self._rows.append((prefix[id(stack)], row))

    def improved(self, accuracy: Sequence[float], epoch: int) -> list[int]:
        """Record epoch ``epoch`` (1-based)'s accuracies; the adapters that beat their best (NaN never does)."""
        better = [i for i, a in enumerate(accuracy) if a > self.accuracy[i]]
        for i in better:
            self.accuracy[i], self.epoch[i] = accuracy[i], epoch
        return better

    @torch.no_grad()
    def snapshot(self, bank: InCABank, adapters: Sequence[int], active: Sequence[int] | None = None) -> None:
        """Keep the current weights of ``adapters`` (indices into the whole bank) from ``bank``: the whole bank, or
        the subset of it whose adapters are ``active`` (successive halving's survivors, in order)."""
        where = {i: k for k, i in enumerate(active)} if active is not None else None
        for i in adapters:
            stack, row = bank.locate(i if where is None else where[i])
            prefix, kept_row = self._rows[i]
            for name, p in stack.named_parameters():
                self.state[prefix + name][kept_row] = p[row]

    @torch.no_grad()
    def restore(self, bank: InCABank) -> None:
        for name, p in bank.named_parameters():
            p.copy_(self.state[name])


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
    schedule: str = "cosine",
    eval_split: str | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_identity: Mapping[str, object] | None = None,
    progress: bool = True,
    micro_batches: int = 1,
    halving: SuccessiveHalving | None = None,
    log: TrainingLog | None = None,
) -> BankHistory:
    """Train every adapter of ``bank`` on the ``train`` split: one forward, one backward (the sum of the
    adapters' mean cross-entropies, so each gets its own gradient) and one :class:`BatchedAdamW` step per
    batch, learning rates from the specs times ``schedule`` (:func:`~inca.train.optim.lr_schedule`: cosine, linear
    or constant) after a linear warm-up (``warmup_steps``, else ``warmup_ratio`` of all steps; the defaults are
    inca-train's, see :mod:`inca.train.config`). bf16 autocast on CUDA.

    An adapter whose loss goes non-finite is marked in ``bank.diverged`` and frozen from then on; the
    others go on unchanged. With ``eval_split`` each epoch ends with an accuracy on that split and each adapter
    ends with the weights of its best epoch there (``history.best_epoch``), the model selection of the
    end-to-end methods; on live activations that costs one pass over the split per epoch. With
    ``checkpoint_path`` the bank, optimizer state, best-epoch weights and history are saved atomically after
    each epoch, and a run finding its checkpoint resumes from it (same result as an uninterrupted run).
    ``micro_batches`` > 1 runs each batch as that many parts whose gradients add up: less memory, the same
    updates up to rounding (a batch that runs out of CUDA memory doubles it by itself).
    ``checkpoint_identity`` is what else that checkpoint must have been made with (the backbone's and the data's
    fingerprints, the run's options): the checkpoint of any other run, or a damaged one, is discarded.

    With ``halving`` (successive halving; needs ``eval_split``), after each of its rungs only the best adapters by
    their best accuracy on ``eval_split`` so far go on training (:meth:`SuccessiveHalving.survivors`): the others'
    rows leave the trained bank's stacks and the optimizer's states, and a layer no survivor reads is no longer
    read, so later epochs cost only the survivors. Each survivor trains exactly as it would in a bank that prunes
    nothing (bit for bit on a CPU: see :data:`inca.adapters.inca.ATTEND_ROWS`; CUDA's kernels round by shape).
    At the end every adapter, pruned or not, is back in ``bank`` with the weights of its best epoch; the history
    says how long each trained (``epochs_trained``, ``stopped_rung``) and what each rung did (``rungs``).

    With ``log`` each epoch of each adapter goes to TensorBoard as it ends, one run per adapter named by
    :func:`~inca.training_log.adapter_names`; a resumed run writes only the epochs it trains.
    """
    require_positive(epochs=epochs, batch_size=batch_size, micro_batches=micro_batches)
    if halving is not None and eval_split is None:
        raise InCAError("successive halving ranks the adapters on a validation split; give train_bank eval_split")
    rungs = halving.rungs(epochs) if halving is not None else []
    device = torch.device(device)
    n = _check_source(bank, source, "train")
    bank.to(device)
    world = current()
    world.broadcast_parameters(bank.parameters())  # replicas start as rank 0's (a no-op in one process)
    global_batch = batch_size * world.size  # each rank trains on its shard of it (see inca.distributed)
    steps_per_epoch = math.ceil(n / global_batch)
    total = epochs * steps_per_epoch
    warmup = round(warmup_ratio * total) if warmup_steps is None else warmup_steps
    config = _run_config(bank, n, epochs, global_batch, seed, warmup, min_lr_ratio, eval_split, halving, rungs,
                         checkpoint_identity, schedule)
    best = BestEpochs(bank) if eval_split is not None else None
    multiplier = lr_schedule(schedule, total, warmup, min_lr_ratio)
    steps = _BankSteps(bank, BatchedAdamW(bank.optimizer_groups()), multiplier, device, micro_batches, done=0)
    start, history = _resume_or_start(checkpoint_path, config, steps, best)
    steps.done = start * steps_per_epoch
    reads = source if len(steps.active) == len(bank) else narrow_source(source, steps.bank.layers)
    bar = progress_bar(total=total, initial=steps.done, enabled=progress and world.is_main, desc="InCA bank",
                       unit="step")
    names = adapter_names([asdict(spec) for spec in bank.specs]) if log is not None else []
    for epoch in range(start, epochs):
        loss_sum = steps.epoch(reads, epoch_batches(n, global_batch, seed, epoch), epoch, bar)
        epoch_loss = (loss_sum / steps_per_epoch).masked_fill(steps.bank.diverged, math.nan).tolist()
        history.train_loss.append(_spread(epoch_loss, steps.active, len(bank)))
        for i in steps.active:
            history.epochs_trained[i] += 1
        message = f"epoch {epoch + 1}/{epochs}: best train loss {_nanmin(epoch_loss):.4f}"
        if best is not None:
            accuracy = _validate_and_snapshot(steps, reads, eval_split, batch_size, best, history, epoch)
            message += f", best {eval_split} accuracy {accuracy:.4f}"
        bar.set_postfix_str(message.split(": ", 1)[1])  # a redirected log shows it at each tenth of the command
        logger.debug(message + f", {sum(steps.frozen)}/{len(steps.bank)} diverged")
        history.diverged = steps.diverged(history.diverged)
        if log is not None:
            _log_epoch(log, names, bank.specs, history, steps)
        if epoch + 1 in rungs:
            _prune(steps, halving, history, best, rungs.index(epoch + 1) + 1)
            reads = narrow_source(source, steps.bank.layers)
        if checkpoint_path is not None and world.is_main:
            _save_checkpoint(Path(checkpoint_path), steps.bank, steps.optimizer, config, epoch + 1, history,
                             best.state if best is not None else {})
    bar.close()
    history.diverged = steps.diverged(history.diverged)
    if steps.bank is not bank:  # pruned adapters are back from their snapshots below
        bank.diverged.copy_(torch.tensor(history.diverged, device=bank.diverged.device))
    if best is not None:
        best.restore(bank)
        history.best_epoch = list(best.epoch)
    return history


def _log_epoch(
    log: TrainingLog, names: list[str], specs: Sequence[AdapterSpec], history: BankHistory, steps: _BankSteps
) -> None:
    """The epoch just recorded in ``history``, one run per adapter that trained in it and has not diverged: its
    training loss, validation accuracy (when validated) and learning rate at the end of the epoch."""
    epoch, multiplier = len(history.train_loss), steps.schedule(steps.done)
    for i in steps.active:
        if not history.diverged[i]:
            accuracy = history.val_accuracy[-1][i] if len(history.val_accuracy) == epoch else None
            log.scalars(epoch, {"train/loss": history.train_loss[-1][i], "val/accuracy": accuracy,
                                "lr": specs[i].lr * multiplier}, run=names[i])


def _spread(values: list[float], active: list[int], size: int) -> list[float]:
    """Values of the adapters still training (``active``, indices into the whole bank) as one per adapter of the
    whole bank, NaN for those pruned."""
    spread = [math.nan] * size
    for value, i in zip(values, active):
        spread[i] = value
    return spread


def _prune(
    steps: _BankSteps, halving: SuccessiveHalving, history: BankHistory, best: BestEpochs, rung: int
) -> None:
    """Rung ``rung`` (1-based) of successive halving: keep the adapters that :meth:`SuccessiveHalving.survivors`
    chooses from the history (rank 0's choice on every rank, though each would take the same) and record it. A rung
    where every adapter has diverged prunes none: the run ends as a grid's whose adapters all diverged would."""
    entered = list(steps.active)
    survivors = halving.survivors(entered, best.accuracy, history.train_loss[-1], history.diverged)
    survivors = current().broadcast(survivors) or entered
    for i in set(entered) - set(survivors):
        history.stopped_rung[i] = rung
    history.rungs.append({"rung": rung, "epoch": len(history.train_loss), "entered": len(entered),
                          "kept": len(survivors)})
    logger.info("rung %d after epoch %d: the best %d of %d adapters by validation accuracy go on training: %s",
                rung, len(history.train_loss), len(survivors), len(entered), survivors)
    if len(survivors) < len(entered):
        steps.keep(survivors)


class _BankSteps:
    """The updates of one :func:`train_bank` run, in order: forward and backward on this rank's part of each
    global batch, gradients and losses summed over the ranks, adapters whose loss went non-finite frozen, one
    :class:`BatchedAdamW` step at the schedule's learning rate."""

    def __init__(
        self, bank: InCABank, optimizer: BatchedAdamW, schedule: Callable[[int], float], device: torch.device,
        micro_batches: int, done: int,
    ) -> None:  # fmt: skip
        self.bank, self.optimizer, self.schedule, self.device = bank, optimizer, schedule, device
        self.micro_batches = micro_batches  # doubled whenever a batch runs out of CUDA memory
        self.done = done  # updates made so far: the schedule's position
        self.frozen = bank.diverged.tolist()
        self.world = current()
        self.size = len(bank)  # the whole bank's
        self.active = list(range(self.size))  # the adapters still training, as indices into the whole bank

    def keep(self, survivors: Sequence[int]) -> None:
        """Go on training only ``survivors`` (indices into the whole bank, in order): their rows of the parameters
        and of the optimizer's states move to a bank of them alone; the others' rows leave."""
        rows = [self.active.index(i) for i in survivors]
        bank = self.bank.subset(rows)
        optimizer = BatchedAdamW(bank.optimizer_groups(), self.optimizer.betas, self.optimizer.eps)
        with torch.no_grad():
            for new, old in enumerate(rows):
                (target, row), (source, old_row) = bank.locate(new), self.bank.locate(old)
                weights = source.params()
                for name, param in target.params().items():
                    old_state = self.optimizer.state_of(weights[name])
                    for key, state in optimizer.state_of(param).items():
                        state[row] = old_state[key][old_row]
        self.bank, self.optimizer, self.active = bank, optimizer, list(survivors)
        self.frozen = bank.diverged.tolist()

    def diverged(self, whole: list[bool]) -> list[bool]:
        """Which adapters of the whole bank have diverged: the training ones' flags over ``whole`` (the last
        known flags, those of pruned adapters included; empty at first)."""
        flags = list(whole) or [False] * self.size
        for i, flag in zip(self.active, self.bank.diverged.tolist()):
            flags[i] = flag
        return flags

    def epoch(self, source: ActivationSource, batches: list[np.ndarray], epoch: int, bar: Any) -> Tensor:
        """One update per global batch of the train split; each adapter's summed loss (0 once diverged)."""
        loss_sum = torch.zeros(len(self.bank), device=self.device)
        for loaded, share in self.world.sharded(batches, functools.partial(source.loader, "train")):
            loss_sum += self.update(loaded, share, epoch)
            bar.update()
        return loss_sum

    def update(self, loaded: tuple[dict[int, Tensor], Tensor] | None, share: float, epoch: int) -> Tensor:
        """One update from this rank's part of a global batch (None: its part of a short last batch is empty,
        weighing ``share`` of it); each adapter's loss on the global batch."""
        bank = self.bank
        losses = torch.zeros(len(bank), device=self.device)
        if loaded is not None:
            features = {layer: loaded[0][layer].to(self.device, non_blocking=True) for layer in bank.layers}
            labels = loaded[1].to(self.device, non_blocking=True)
            losses = self._forward_backward(features, labels, share)
        self.world.all_reduce_gradients(bank.parameters())
        self.world.all_reduce_(losses)
        bad = ~torch.isfinite(losses) & ~bank.diverged
        if bad.any():
            if loaded is not None:
                _check_finite(features, epoch)
            bank.diverged |= bad
            self.frozen = bank.diverged.tolist()
            logger.warning(
                "adapters %s diverged (non-finite loss) at epoch %d step %d: frozen, the others go on",
                bad.nonzero().flatten().tolist(), epoch + 1, self.done,
            )  # fmt: skip
        losses = losses.masked_fill(bank.diverged, 0.0)
        self.optimizer.step(self.schedule(self.done), frozen=self.frozen)
        self.optimizer.zero_grad(set_to_none=False)
        self.done += 1
        return losses.detach()

    def _forward_backward(self, features: dict[int, Tensor], labels: Tensor, share: float) -> Tensor:
        """:func:`_forward_backward` in ``micro_batches``, twice as many after each CUDA out-of-memory error."""
        while True:
            try:
                return _forward_backward(self.bank, features, labels, self.micro_batches, share)
            except torch.OutOfMemoryError:
                if self.device.type != "cuda" or self.micro_batches >= labels.shape[0]:
                    raise
                self.optimizer.zero_grad(set_to_none=False)
                torch.cuda.empty_cache()
                self.micro_batches *= 2
                logger.warning("out of CUDA memory: each batch of %d now runs as %d micro-batches whose gradients "
                               "add up (the effective batch stays %d)", labels.shape[0], self.micro_batches,
                               labels.shape[0])


def _validate_and_snapshot(
    steps: _BankSteps, source: ActivationSource, split: str, batch_size: int, best: BestEpochs,
    history: BankHistory, epoch: int,
) -> float:  # fmt: skip
    """Record epoch ``epoch`` (0-based)'s accuracy of every adapter still training on ``split`` (NaN for pruned
    ones) and keep the weights of those that improved; the best accuracy of the epoch."""
    accuracy = evaluate_bank(steps.bank, source, split, batch_size).tolist()
    history.val_accuracy.append(_spread(accuracy, steps.active, len(best.accuracy)))
    training = set(steps.active)
    improved = [i for i in best.improved(history.val_accuracy[-1], epoch + 1) if i in training]
    best.snapshot(steps.bank, improved, steps.active)
    return _nanmax(accuracy)


def _nanmin(values: list[float]) -> float:
    return min((v for v in values if not math.isnan(v)), default=math.nan)


def _nanmax(values: list[float]) -> float:
    return max((v for v in values if not math.isnan(v)), default=math.nan)


def _eval_logits(
    bank: InCABank, source: ActivationSource, split: str, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(logits [E, B, C], labels [B])`` over ``split`` in order, on the bank's device, inference mode."""
    batches = current().shard_batches(_check_source(bank, source, split), batch_size)  # callers sum the counts
    device = bank.diverged.device
    with torch.inference_mode(), autocast(device):
        for features, labels in source.loader(split, batches):
            yield bank({layer: features[layer].to(device) for layer in bank.layers}), labels.to(device)


def evaluate_bank(
    bank: InCABank, source: ActivationSource, split: str, batch_size: int = EVAL_BATCH_SIZE
) -> Tensor:
    """Accuracy of every adapter on ``split`` (on the bank's device): a CPU float tensor ``[E]``, NaN for
    diverged adapters."""
    correct = torch.zeros(len(bank), dtype=torch.long, device=bank.diverged.device)
    for logits, labels in _eval_logits(bank, source, split, batch_size):
        correct += (logits.argmax(-1) == labels).sum(1)
    current().all_reduce_(correct)
    return (correct.double() / source.num_rows(split)).float().masked_fill(bank.diverged, math.nan).cpu()


def evaluate_ensemble(
    bank: InCABank, source: ActivationSource, members: Sequence[int], split: str, batch_size: int = EVAL_BATCH_SIZE
) -> float:
    """Accuracy on ``split`` of the parallel ensemble of adapters ``members``: the argmax of their mean
    class probabilities (what :class:`~inca.adapters.saved.TaskAdapter` serves for them)."""
    index = torch.tensor(list(members), device=bank.diverged.device)
    correct = torch.zeros((), dtype=torch.long, device=bank.diverged.device)
    for logits, labels in _eval_logits(bank, source, split, batch_size):
        probabilities = logits.index_select(0, index).float().softmax(-1).mean(0)
        correct += (probabilities.argmax(-1) == labels).sum()
    return int(current().all_reduce_(correct)) / source.num_rows(split)


def top_adapters(accuracy: Tensor, k: int) -> list[int]:
    """The ``k`` adapters with the best ``accuracy`` (NaN, diverged, excluded), best first; ties to the earliest."""
    ranked = sorted((i for i, a in enumerate(accuracy.tolist()) if a == a), key=lambda i: (-accuracy[i].item(), i))
    return ranked[:k]


def select_best(
    bank: InCABank, source: ActivationSource, split: str = "val", batch_size: int = EVAL_BATCH_SIZE
) -> tuple[int, Tensor]:
    """Index of the adapter with the best accuracy on ``split`` (a validation split: never ``test``),
    diverged adapters excluded, and all the accuracies. Ties go to the earliest spec."""
    if split == "test":
        raise InCAError("selecting adapters on the test split leaks it into the result; select on 'val'")
    if bank.diverged.all():
        raise InCAError(f"all {len(bank)} adapters diverged; lower the learning rates (--lr) and train again")
    accuracy = evaluate_bank(bank, source, split, batch_size)
    return top_adapters(accuracy, 1)[0], accuracy


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file, bank and optimizer tensors, run config and history as metadata.
# ----------------------------------------------------------------------------------------------------


def _save_checkpoint(
    path: Path, bank: InCABank, optimizer: BatchedAdamW, config: dict, epoch: int, history: BankHistory,
    best: dict[str, Tensor],
) -> None:  # fmt: skip
    tensors = {f"bank.{k}": v for k, v in bank.state_dict().items()}
    tensors.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    tensors.update({f"best.{k}": v for k, v in best.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"epoch": str(epoch), "config": json.dumps(config), "history": json.dumps(asdict(history))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _forward_backward(
    bank: InCABank, features: dict[int, Tensor], labels: Tensor, chunks: int, share: float = 1.0
) -> Tensor:
    """Each adapter's mean cross-entropy on the batch times ``share`` (the batch's part of a global batch split
    across ranks), its gradients accumulated over ``chunks`` micro-batches (each weighted by its share of the
    batch, so the gradient is the full batch's; never more micro-batches than rows). Diverged adapters, and
    adapters whose loss is not finite, contribute no gradient."""
    total = torch.zeros(len(bank), device=labels.device)
    chunks = min(chunks, labels.shape[0])
    for rows in torch.arange(labels.shape[0], device=labels.device).tensor_split(chunks):
        with autocast(labels.device):
            logits = bank({layer: tokens[rows] for layer, tokens in features.items()} if chunks > 1 else features)
        losses = per_adapter_loss(logits.float(), labels[rows] if chunks > 1 else labels)
        if (weight := share * len(rows) / labels.shape[0]) != 1.0:
            losses = losses * weight
        losses.masked_fill(bank.diverged | ~torch.isfinite(losses), 0.0).sum().backward()
        total += losses.detach()
    return total


def _check_finite(features: Mapping[int, Tensor], epoch: int) -> None:
    """A non-finite loss from non-finite activations is corrupt data, not a diverged adapter: say so."""
    corrupt = [layer for layer, tokens in features.items() if not torch.isfinite(tokens).all()]
    if corrupt:
        raise InCAError(
            f"the activations of layer(s) {corrupt} hold NaN or infinity (epoch {epoch + 1}): the activation store "
            "is corrupt, or the backbone overflows its dtype; check it with inca-cache --verify and rebuild it "
            "with inca-cache --rebuild (or --dtype bfloat16)"
        )


def _run_config(
    bank: InCABank, train_rows: int, epochs: int, global_batch: int, seed: int, warmup: int, min_lr_ratio: float,
    eval_split: str | None, halving: SuccessiveHalving | None = None, rungs: Sequence[int] = (),
    identity: Mapping[str, object] | None = None, schedule: str = "cosine",
) -> dict:  # fmt: skip
    """What identifies a run, JSON round-tripped as a checkpoint stores it: only a checkpoint of this very run
    is resumed (``identity``: what else it must have been made with, such as the backbone's and the data's
    fingerprints)."""
    config = {
        "specs": [asdict(s) for s in bank.specs],
        "dim": bank.dim,
        "num_classes": bank.num_classes,
        "train_rows": train_rows,
        "epochs": epochs,
        "batch_size": global_batch,
        "seed": seed,
        "warmup_steps": warmup,
        "min_lr_ratio": min_lr_ratio,
        "eval_split": eval_split,
        "restores_best_epoch": eval_split is not None,  # checkpoints hold best-epoch weights since then
        "identity": dict(identity or {}),
    }
    if halving is not None:  # a grid run's config is as it always was, so its checkpoints still resume
        config["halving"] = {"rate": halving.rate, "rungs": list(rungs)}
    if schedule != "cosine":  # likewise a cosine run's
        config["schedule"] = schedule
    return json.loads(json.dumps(config))


def _resume_or_start(
    checkpoint_path: str | os.PathLike | None, config: dict, steps: _BankSteps, best: BestEpochs | None,
) -> tuple[int, BankHistory]:  # fmt: skip
    """The epochs done and the history so far: those of ``checkpoint_path`` when it holds this very run (its
    bank, optimizer and best-epoch weights loaded, the adapters that successive halving pruned left out first),
    else none. A checkpoint is inca's own cache: one of another run is discarded (logged), and so is a damaged
    one (garbage, truncated, tensors of other shapes), with a warning, not an error."""
    size = steps.size
    fresh = BankHistory(epochs_trained=[0] * size, stopped_rung=[None] * size)
    if checkpoint_path is None:
        return 0, fresh
    path = Path(checkpoint_path)
    try:
        if not _resumable(path, config):
            return 0, fresh
        with safe_open(path, framework="pt") as f:
            stopped = json.loads(f.metadata()["history"]).get("stopped_rung") or [None] * size
    except Exception as exc:  # whatever a damaged file makes safetensors or json raise
        logger.warning("%s is damaged (%s): starting this run from scratch", path, first_line(exc))
        return 0, fresh
    survivors = [i for i in range(size) if stopped[i] is None]
    if len(survivors) < size:
        steps.keep(survivors)  # the checkpoint holds the survivors' rows only
    try:
        start, history, saved_best = _load_checkpoint(path, steps.bank, steps.optimizer, config,
                                                      best.state if best is not None else {})
    except Exception as exc:  # checked before anything is loaded: the bank is as it was, unless pruned above
        if len(survivors) < size:
            raise InCAError(f"{path} is damaged ({first_line(exc)}): delete it and run the same command again") \
                from None
        logger.warning("%s is damaged (%s): starting this run from scratch", path, first_line(exc))
        return 0, fresh
    if not history.epochs_trained:  # a checkpoint written before these were recorded: a grid run
        history.epochs_trained, history.stopped_rung = [start] * size, [None] * size
    if best is not None:
        best.state = {name: saved_best[name].to(kept.device) for name, kept in best.state.items()}
        for epoch, accuracy in enumerate(history.val_accuracy):
            best.improved(accuracy, epoch + 1)
    logger.info("resuming bank training from %s after epoch %d/%d", checkpoint_path, start, config["epochs"])
    return start, history


def _resumable(path: Path, config: dict) -> bool:
    """Whether ``path`` holds a checkpoint of this very run. One of another run (say, of a run whose adapters all
    diverged, rerun with other learning rates, or one made from other backbone weights or data) is stale: it is
    replaced, not allowed to block the new run, nor resumed by it."""
    if not path.is_file():
        return False
    with safe_open(path, framework="pt") as f:
        saved = (f.metadata() or {}).get("config")
    if saved is not None and json.loads(saved) == config:
        return True
    logger.info("%s is a checkpoint of another configuration: starting this run from scratch", path)
    return False


def _load_checkpoint(
    path: Path, bank: InCABank, optimizer: BatchedAdamW, config: dict, best_state: Mapping[str, Tensor]
) -> tuple[int, BankHistory, dict[str, Tensor]]:
    """Load the bank and optimizer state; the epochs done, the history and the best-epoch weights (of the whole
    bank, shaped as ``best_state``, while ``bank`` holds only the adapters still training). Everything is
    checked before anything is loaded (a ``ValueError`` names what does not fit)."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    epoch, history = int(metadata["epoch"]), BankHistory(**json.loads(metadata["history"]))
    if not 0 < epoch <= config["epochs"] or len(history.train_loss) != epoch:
        raise ValueError(f"it records epoch {epoch} of {config['epochs']} and {len(history.train_loss)} of history")
    state = {k[5:]: v for k, v in tensors.items() if k.startswith("bank.")}
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    if not _same_shapes(state, bank.state_dict()) or not _same_shapes(best, best_state):
        raise ValueError("its tensors do not fit this bank")
    optimizer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")})  # checks first
    bank.load_state_dict(state)
    return epoch, history, best


def _same_shapes(saved: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> bool:
    return saved.keys() == expected.keys() and all(saved[k].shape == expected[k].shape for k in expected)
