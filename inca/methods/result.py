"""What a method's run reports: :class:`MethodResult`, the figures every method has, and each kind's own.

:func:`~inca.methods.run.run_method` returns one; ``inca-compare`` reads its fields and records
:meth:`MethodResult.to_dict` (JSON-ready) in ``compare.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["EndToEndResult", "InCAResult", "MethodResult"]


@dataclass(frozen=True, kw_only=True)
class MethodResult:
    """Every method's figures: accuracies at the epoch with the best validation accuracy, the trainable
    parameters (head included), the optimiser steps of the kept run, its training loss (per step, or per epoch
    for a bank) and the tuned values it was chosen with. Its training curves, one value per epoch trained:
    ``epoch_loss``, the epoch's mean training loss (None: the epoch's first step diverged), and ``val_curve``, the
    validation accuracy after it (``val_curve[best_epoch - 1] == val_acc``)."""

    test_acc: float
    val_acc: float
    best_epoch: int
    trainable_params: int
    steps: int
    loss_curve: list[float]
    tuned: dict[str, Any]
    epoch_loss: list[float | None]
    val_curve: list[float | None]

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values, one key per field."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class EndToEndResult(MethodResult):
    """An end-to-end method's run: the step its loss diverged at (None: it did not), every point of its tuning
    grid, and where its PEFT export went (None: not exported)."""

    diverged_at_step: int | None
    grid: list[dict[str, Any]]
    peft_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        if self.peft_dir is None:
            del values["peft_dir"]
        return values


@dataclass(frozen=True, kw_only=True)
class InCAResult(MethodResult):
    """An InCA bank's run: where its activations came from (``cache``: a store, maybe built by an earlier run;
    ``live``: the backbone), the best adapter's description and, for ``layers=best:K``, the probe's ranking of the
    layers on val that chose them (None: the layers were given)."""

    activations: str
    best: dict[str, Any]
    layer_ranking: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        if self.layer_ranking is None:
            del values["layer_ranking"]
        return values
