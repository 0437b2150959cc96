"""Successive halving inside a bank: the adapters of a grid train together and, at each rung, only the best
1/ETA by validation accuracy go on training (Jamieson & Talwalkar, AISTATS 2016; Hyperband, Li et al., JMLR 2018;
ASHA, Li et al., MLSys 2020). In a bank this is exact and cheap: a pruned adapter's rows leave the stacked
parameters and the optimizer's states, so later epochs cost only the survivors (:func:`~inca.train.bank.train_bank`
applies the decisions taken here).

This module imports no torch: the schedule and the decisions are plain arithmetic on the history's numbers, so
every rank of a data-parallel run, and a run resumed from a checkpoint, takes the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InCAError

__all__ = ["SEARCHES", "SuccessiveHalving"]

# How a bank's grid is searched: every adapter for every epoch, or successive halving.
SEARCHES = ("grid", "halving")


@dataclass(frozen=True)
class SuccessiveHalving:
    """Prune to the best ``ceil(n / rate)`` of the ``n`` adapters still training at each rung; the rungs fall at
    ``min_epochs``, ``min_epochs * rate``, ``min_epochs * rate^2``, ... epochs and the last one is the end of
    training (default ``min_epochs``: the geometric schedule whose rungs end exactly there, see :meth:`rungs`)."""

    rate: int = 3
    min_epochs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int) or self.rate < 2:
            raise InCAError(f"the halving rate must be an integer >= 2 (keep 1/rate at each rung), not {self.rate!r}")
        if self.min_epochs is not None and self.min_epochs < 1:
            raise InCAError(f"--min-epochs must be a positive integer, not {self.min_epochs!r}")

    def rungs(self, epochs: int) -> list[int]:
        """The epochs (1-based) after which adapters are pruned, in order: ``R, R*rate, R*rate^2, ...`` below
        ``epochs``, where training ends. Without ``min_epochs``, ``R`` is ``epochs / rate^k`` rounded, ``k`` the
        most rungs that keep it at least one epoch: Hyperband's most aggressive bracket, whose last rung is the
        full budget (9 epochs at rate 3: rungs after epochs 1 and 3; 10 epochs: 1 and 3; 15 epochs: 2 and 5)."""
        if self.min_epochs is not None:
            if self.min_epochs > epochs:
                raise InCAError(f"--min-epochs {self.min_epochs} is above --epochs {epochs}: the first rung must "
                                "fall within training; lower --min-epochs or raise --epochs")
            rungs, rung = [], self.min_epochs
            while rung < epochs:
                rungs.append(rung)
                rung *= self.rate
            return rungs
        k = 0
        while self.rate ** (k + 1) <= epochs:
            k += 1
        rungs = {max(1, math.floor(epochs / self.rate ** (k - i) + 0.5)) for i in range(k)}
        return sorted(r for r in rungs if r < epochs)

    def keep(self, entered: int) -> int:
        """How many of the ``entered`` adapters go on past a rung: ``ceil(entered / rate)``."""
        return -(-entered // self.rate)

    def survivors(
        self, entered: Sequence[int], accuracy: Sequence[float], train_loss: Sequence[float],
        diverged: Sequence[bool],
    ) -> list[int]:  # fmt: skip
        """Which of the ``entered`` adapters (indices into the other sequences) go on past a rung, in index order:
        the best :meth:`keep` of those that have not diverged, by ``accuracy`` (each adapter's best validation
        accuracy so far: the epoch it would end with), ties to the lower ``train_loss`` at the rung, then to the
        earlier index. Every input is the same on every rank and after a resume, so is the decision."""
        candidates = [i for i in entered if not diverged[i] and math.isfinite(accuracy[i])]
        loss = [x if math.isfinite(x) else math.inf for x in train_loss]
        ranked = sorted(candidates, key=lambda i: (-accuracy[i], loss[i], i))
        return sorted(ranked[: self.keep(len(entered))])
