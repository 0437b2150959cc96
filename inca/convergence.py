"""Convergence speed, measured the same way for every method: on each task, the first step whose smoothed
training loss reaches a common target, the worst (highest) of the compared methods' final smoothed losses.

Every method is timed by its own first crossing of the same target (never one method's total steps against
another's crossing), and the ratios between methods come from those figures alone. The loss is smoothed by a
trailing mean over ``window`` steps (:func:`smoothed_loss`), the same window for every method. Only runs whose
curve has one loss per optimiser step are measured: a run that recorded one mean loss per epoch (an InCA bank)
or that diverged is listed as not measured, with why. So is a method that trains only a head on frozen features
(``Method.features_only``: ``linear``; looked up by name, so older ``compare.json`` files read the same): its
loss is bounded by those features and is where the end-to-end methods start (``head_init`` ``linear-probe``), so
as the worst final loss it would set a target they all meet within a few steps. With several runs of a comparison
(one per seed) each figure is reported as its min-max over them; with one run there is no spread, and the table
says so.

No torch (the method registry loads without it): this reads ``compare.json`` records (``task``, ``method``,
``steps``, ``loss_curve``, ``diverged_at_step``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inca.methods import METHODS
from inca.report import markdown_table

__all__ = ["DEFAULT_WINDOW", "FEATURES_ONLY", "convergence_lines", "convergence_table", "crossings", "smoothed_loss",
           "steps_to_reach"]

# inca's own choice, the window docs/results.md has used: it averages several batches' losses yet stays short against
# runs of hundreds of steps.
DEFAULT_WINDOW = 10
FEATURES_ONLY = ("a head on frozen features: its loss is bounded by them and is where the end-to-end methods start, "
                 "so it would set a target they meet within a few steps")


def smoothed_loss(curve: Sequence[float], window: int = DEFAULT_WINDOW) -> np.ndarray:
    """Trailing mean of a per-step loss: element t averages steps max(0, t - window + 1) .. t."""
    sums = np.cumsum(np.asarray(curve, dtype=np.float64))
    starts = np.maximum(np.arange(len(curve)) - window + 1, 0)
    return (sums - np.concatenate([[0.0], sums])[starts]) / (np.arange(len(curve)) - starts + 1)


def steps_to_reach(curve: Sequence[float], target: float, window: int = DEFAULT_WINDOW) -> int | None:
    """The first step (1-based) whose smoothed loss is at or below ``target``; None if it never is."""
    reached = np.flatnonzero(smoothed_loss(curve, window) <= target)
    return int(reached[0]) + 1 if reached.size else None


def crossings(curves: Mapping[str, Sequence[float]], window: int = DEFAULT_WINDOW) -> tuple[float, dict[str, int]]:
    """The common target (the highest final smoothed loss among ``curves``, method -> per-step loss) and each
    method's first step at or below it. Every method reaches it: the worst one at its last step at the latest."""
    target = max(float(smoothed_loss(curve, window)[-1]) for curve in curves.values())
    return target, {method: steps_to_reach(curve, target, window) for method, curve in curves.items()}


def _why_not_measured(record: Mapping[str, Any]) -> str | None:
    """Why a run's curve is not measured (None: it is)."""
    method = METHODS.get(record["method"])  # None: a plugin method not installed here
    if method is not None and method.features_only:
        return FEATURES_ONLY
    if record.get("diverged_at_step") is not None:
        return f"diverged at step {record['diverged_at_step']}"
    if len(record.get("loss_curve") or []) != record["steps"] or not record["steps"]:
        return "its trainer records one loss per epoch, not per step"
    return None


def _measurable(summary: Mapping[str, Any]) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, str]]]:
    """One run's per-step curves by task and method, and why the others are not measured."""
    curves: dict[str, dict[str, list[float]]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for record in summary["results"]:
        why = _why_not_measured(record)
        if why is None:
            curves.setdefault(record["task"], {})[record["method"]] = record["loss_curve"]
        else:
            skipped.setdefault(record["task"], {})[record["method"]] = why
    return curves, skipped


def _spread(values: Sequence[float]) -> list[float]:
    return [min(values), max(values)]


def convergence_table(
    summaries: Sequence[Mapping[str, Any]], window: int = DEFAULT_WINDOW, reference: str | None = None
) -> dict[str, Any]:
    """The convergence figures of one or more runs of a comparison (``compare.json`` contents, e.g. one per seed):
    for each task, the target and each measured method's steps to it and its ratio ``reference's steps / its
    steps`` (above 1: fewer steps than the reference), each as ``[min, max]`` over the runs; ``reference``
    defaults to the first measured method. A method is measured on a task only where every run measured it."""
    runs = [_measurable(summary) for summary in summaries]
    tasks = list(dict.fromkeys(record["task"] for summary in summaries for record in summary["results"]))
    table: dict[str, Any] = {"smoothing": f"trailing mean over {window} steps", "window": window,
                             "seeds": [summary["config"]["seed"] for summary in summaries], "tasks": {}}
    for task in tasks:
        curves = [run_curves.get(task, {}) for run_curves, _ in runs]
        measured = [m for m in curves[0] if all(m in run for run in curves)]
        skipped = {m: why for _, run_skipped in runs for m, why in run_skipped.get(task, {}).items()}
        for m in (m for run in curves for m in run if m not in measured):
            skipped.setdefault(m, "not measured in every run")
        entry: dict[str, Any] = {"methods": {}, "not_measured": skipped}
        if measured:
            ref = reference if reference in measured else measured[0]
            figures = [crossings({m: run[m] for m in measured}, window) for run in curves]
            entry.update(target=_spread([target for target, _ in figures]), reference=ref, methods={
                m: {"steps": _spread([steps[m] for _, steps in figures]),
                    "steps_run": _spread([len(run[m]) for run in curves]),
                    "ratio": _spread([steps[ref] / steps[m] for _, steps in figures])} for m in measured})
        table["tasks"][task] = entry
    return table


def _range(values: Sequence[float], digits: int) -> str:
    low, high = values
    return f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else \
        f"{low:.{digits}f}-{high:.{digits}f}"


def convergence_lines(table: Mapping[str, Any]) -> list[str]:
    """:func:`convergence_table` as Markdown: what is measured, then one row per task and method."""
    seeds = table["seeds"]
    spread = (f"min-max over {len(seeds)} runs (seeds {', '.join(map(str, seeds))})" if len(seeds) > 1
              else f"one seed ({seeds[0]}): no spread")
    lines = [f"Steps until the training loss ({table['smoothing']}) first reaches the task's target, the highest "
             "final smoothed loss of the methods measured; ratio: the reference method's steps / the method's "
             f"(above 1: fewer steps). Every method timed by its own first crossing; {spread}.", ""]
    rows = []
    for task, entry in table["tasks"].items():
        for i, (method, figures) in enumerate(entry["methods"].items()):
            rows.append([task, _range(entry["target"], 4) if i == 0 else "", method, _range(figures["steps"], 0),
                         _range(figures["steps_run"], 0), entry["reference"], _range(figures["ratio"], 2)])
    headers = ["task", "target loss", "method", "steps to target", "steps run", "reference", "ratio"]
    lines.append(markdown_table(headers, rows).rstrip())
    skipped: dict[str, list[str]] = {}
    for task, entry in table["tasks"].items():
        for method, why in entry["not_measured"].items():
            skipped.setdefault(why, []).append(f"{method} on {task}")
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{', '.join(runs)} ({why})" for why, runs in skipped.items()) + "."]
    return lines
