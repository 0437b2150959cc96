"""Tuning budgets: how many configurations each method trains per task in a comparison, and the hyper-parameters
that give every method the same number (``inca-compare --equal-budget``).

With ``--lr-grid K`` an end-to-end method trains its :meth:`~inca.methods.base.TrainConfig.tuning_grid` (K learning
rates; Compacter K x its reduction factors) and InCA a bank of K learning rates x its other grid axes x its layers.
Under an equal budget every method trains K: a method whose authors tune another axis too keeps that axis at its
default (a field ``X_grid`` is pinned to ``[X]``), and InCA trains its per-layer grid on the layers that the cheap
linear probe ranks best on val, whatever ``rank_by`` says, (``layers=best:L``, L = K / its per-layer grid).
A config may declare its own count and budget (``configurations(lr_grid, num_blocks)``,
``within_budget(lr_grid)``), as InCA's does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from inca.errors import InCAError
from inca.methods.base import MethodConfig, RunConfig
from inca.methods.registry import get_method

__all__ = ["equal_budget", "trained_configurations"]

GRID_SUFFIX = "_grid"  # a tuned axis X declares its values as X_grid (Compacter's reduction_grid)


def trained_configurations(name: str, hparams: Mapping[str, Any], settings: RunConfig,
                           num_blocks: int) -> dict[str, Any]:
    """How many configurations method ``name`` trains per task with ``hparams`` under ``settings``: ``{"total": N,
    "axes": {axis: values}}`` (axes of more than one value)."""
    config = get_method(name).make_config(hparams)
    counted = getattr(config, "configurations", None)
    if counted is not None:
        axes = counted(settings.lr_grid, num_blocks)
        total = math.prod(axes.values())
    elif hasattr(config, "tuning_grid"):
        points = [point.to_dict() for point in config.tuning_grid(settings.lr_grid)]
        axes = {key: len({json.dumps(point[key]) for point in points}) for key in points[0]}
        total = len(points)
    else:  # a method that tunes nothing
        axes, total = {}, 1
    return {"total": total, "axes": {axis: size for axis, size in axes.items() if size > 1}}


def equal_budget(methods: Mapping[str, Mapping[str, Any]], settings: RunConfig,
                 num_blocks: int) -> dict[str, dict[str, Any]]:
    """Each method's hyper-parameters made to train ``settings.lr_grid`` configurations per task (see the module
    docstring); a method that cannot is refused in one line."""
    budget = settings.lr_grid
    chosen = {}
    for name, hparams in methods.items():
        config = get_method(name).make_config(hparams)
        within = getattr(config, "within_budget", None)
        changes = within(budget) if within is not None else _pinned_axes(config)
        chosen[name] = {**hparams, **changes}
        count = trained_configurations(name, chosen[name], settings, num_blocks)["total"]
        if count != budget:
            raise InCAError(f"--equal-budget: {name} would train {count} configurations per task, not the "
                            f"{budget} of --lr-grid {budget}; set its tuned values with --method-args")
    return chosen


def _pinned_axes(config: MethodConfig) -> dict[str, Any]:
    """Every ``X_grid`` field of ``config`` pinned to ``[X]``: the method's other tuned axes at their defaults."""
    fields = config.fields()
    return {key: [getattr(config, key[: -len(GRID_SUFFIX)])] for key in fields
            if key.endswith(GRID_SUFFIX) and key[: -len(GRID_SUFFIX)] in fields}
