"""``inca-train``'s suite: one InCA bank per task (:func:`~inca.train.runner.train_inca_task`) on one backbone,
through :func:`inca.suite.run_suite`.

Each task's adapter (and ensemble) goes to ``OUT/<task>-<fingerprint>/``; ``results.json`` and ``results.md`` are
rewritten after each task, so a rerun with the same configuration skips the finished ones.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inca.adapters.common import describe_trainable, percent_text
from inca.backbone import Backbone
from inca.distributed import current
from inca.io import atomic_write_text
from inca.outputs import TRAIN_REPORT
from inca.progress import command_units
from inca.report import markdown_table, plot_curves
from inca.suite import Report, Unit, finished_on_same_data, run_suite, task_directory
from inca.tasks import Task, by_task_name, task_name, task_names
from inca.train.config import InCATrainConfig
from inca.train.runner import ADAPTER_DIR, ENSEMBLE_DIR, SOURCE_OPTIONS, train_inca_task
from inca.training_log import TrainingLog, adapter_names, scope

__all__ = [
    "CURVES_PNG",
    "REPORT_JSON",
    "REPORT_MD",
    "render_results",
    "plot_adapter_curves",
    "render_summary",
    "run_train_suite",
    "train_config",
    "write_reports",
    "written_files",
]

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD = TRAIN_REPORT, "results.md"
CURVES_PNG = "curves.png"  # in each task's directory


def train_config(backbone: Backbone, layers_spec: str, options: InCATrainConfig) -> dict[str, Any]:
    """What must match for a finished task's results to be reused by a rerun (not where activations come from)."""
    keep = {k: v for k, v in asdict(options).items() if k not in SOURCE_OPTIONS}
    return {"backbone": backbone.fingerprint, "layers": str(layers_spec), **InCATrainConfig.recorded(keep)}


def run_train_suite(
    backbone: Backbone,
    task_specs: Iterable[str],
    layers_for: Callable[[Task], list[int]],
    layers_spec: str,
    options: InCATrainConfig,
    out: str | os.PathLike,
    load_task: Callable[[str], Task],
    overwrite: bool = False,
    log: TrainingLog | None = None,
) -> Report:
    """:func:`~inca.train.runner.train_inca_task` on each task into ``out/<task>-<fingerprint>/``, with a plot of its
    adapters' training curves (``curves.png``); ``results.json`` and ``results.md`` after each task (a rerun with the
    same configuration skips the finished ones). With ``log`` every adapter's epochs also go to TensorBoard, under
    the task's directory name."""
    out = Path(out)
    # Every spec loads before any training starts; results are keyed by the canonical spec (one per task).
    tasks = {task.spec: task for task in map(load_task, task_specs)}

    def train(task: Task) -> dict[str, Any]:
        directory = task_directory(task)
        with scope(log, directory) as task_log:
            result = train_inca_task(backbone, task, layers_for(task), options, out / directory, log=task_log)
        if current().is_main:
            plot_adapter_curves(out / directory / CURVES_PNG, result)
        logger.info("%s: best layer %d, val %.4f, test %.4f, %s (%.1fs)", task.name, result["best"]["layer"],
                    result["val_acc"], result["test_acc"],
                    describe_trainable(result["trainable_params"], result["backbone_params"]), result["seconds"])
        # What to serve, relative to ``out`` (the run moves as one directory): inca-predict --run reads it.
        return {**result, "directory": directory, "serve_dir": f"{directory}/{result['serve']}",
                "fingerprint": task.fingerprint, "typed_spec": task.typed_spec,
                "skipped_images": task.identity.get("skipped_images", 0)}

    fresh = {"backbone": backbone.describe(), "config": train_config(backbone, layers_spec, options), "tasks": {}}
    names = task_names(tasks)
    units = (Unit(spec, names[spec], functools.partial(train, task)) for spec, task in tasks.items())
    with command_units(len(tasks)):
        return run_suite(out, REPORT_JSON, fresh, units, write_reports, overwrite=overwrite,
                         finished=finished_on_same_data(tasks, "trained"))


def write_reports(out: Path, results: Report) -> None:
    """``results.md`` from ``results`` (``results.json``'s content, which the suite writes)."""
    atomic_write_text(out / REPORT_MD, render_results(results))


def plot_adapter_curves(path: Path, result: dict[str, Any]) -> None:
    """One task's training curves: every adapter's training loss and validation accuracy per epoch (a pruned one up
    to its rung), named as in TensorBoard; the selected adapter bold, its best epoch starred."""
    adapters = result["adapters"]
    names = adapter_names(adapters)
    chosen = names[result["best"]["index"]]
    plot_curves(path, {"training loss": {name: a["epoch_loss"] for name, a in zip(names, adapters)},
                       "validation accuracy": {name: a["val_curve"] for name, a in zip(names, adapters)}},
                f"{task_name(result['task'])}: {len(adapters)} adapters (bold: {chosen}, selected on val)",
                highlight=chosen, marks={chosen: result["best"]["best_epoch"]})


def render_summary(results: Report) -> str:
    """The title and the summary table: the best adapter (and ensemble) of each task."""
    backbone = results["backbone"]
    lines = [f"# InCA results: {backbone['name']} ({backbone['weights']} weights)\n"]
    headers = ["task", "best layer", "lr", "queries", "val acc", "test acc", "params", "% backbone", "adapters",
               "activations", "seconds"]
    rows = [
        [name, r["best"]["layer"], r["best"]["lr"], r["best"]["num_queries"], r["val_acc"], r["test_acc"],
         r["trainable_params"], percent_text(r["trainable_percent"]), len(r["adapters"]), r["activations"],
         f"{r['seconds']:.1f}"]
        for name, r in by_task_name(results["tasks"]).items()
    ]
    if _has_halving(results):  # what successive halving spent of the full grid's adapter-epochs
        headers.insert(headers.index("adapters") + 1, "adapter-epochs")
        for row, r in zip(rows, results["tasks"].values()):
            row.insert(headers.index("adapter-epochs"), _spent(r))
    if _asked_for_ensembles(results):
        headers[6:6] = ["ensemble", "ens. val acc", "ens. test acc", "serve"]
        for row, r in zip(rows, results["tasks"].values()):
            ensemble = r.get("ensemble") or {}
            row[6:6] = [_ensemble_cell(ensemble), ensemble.get("val_acc"), ensemble.get("test_acc"),
                        r.get("serve", ADAPTER_DIR)]
    lines.append(markdown_table(headers, rows))
    return "\n".join(lines)


def _ensemble_cell(ensemble: dict[str, Any]) -> str:
    if not ensemble:
        return "-"
    if ensemble.get("val_acc") is None:  # too few adapters did not diverge
        return f"none ({ensemble['requested']} asked)"
    asked = ensemble.get("requested", ensemble["k"])
    return f"top {ensemble['k']}" + (f" ({asked} asked)" if asked != ensemble["k"] else "")


def _legend(results: Report) -> list[str]:
    """What each column of the summary means."""
    backbone_params = next(iter(results["tasks"].values()))["backbone_params"]
    lines = [
        "Columns: **best layer** is the block (0: the first) whose output tokens the task's best adapter reads, the "
        "best being the highest validation accuracy of the whole grid; **lr** and **queries** are that adapter's "
        "learning rate and number of learned queries; **val acc** chose it, **test acc** is measured once, on the "
        "test split, for the chosen adapter only.",
    ]
    if _asked_for_ensembles(results):
        lines.append(
            "**ensemble**: the top-K adapters by val accuracy averaged (`--ensemble K`; fewer when fewer did not "
            "diverge), with its **ens. val acc** and **ens. test acc**; **serve** is what `inca-predict --run "
            "--use ensemble` serves (`--run` alone serves the best adapter): the ensemble only when its val accuracy "
            "is strictly above the best adapter's (a tie goes to the adapter), else the adapter (`results.json`: each "
            "task's `serve` and `serve_dir`)."
        )
    lines.append(
        f"**params**: the best adapter's trainable parameters (its classifier included); **% backbone**: those as a "
        f"share of the frozen backbone's {backbone_params:,} parameters (the ViT without a head; one denominator "
        f"for every method). **adapters**: adapters in the task's grid, trained together as one bank"
        + (" (**adapter-epochs**: epochs trained over all of them, of the full grid's)" if _has_halving(results)
           else "")
        + ". **activations**: `cache` (read from an activation store) or `live` (the backbone run on every batch). "
        "**seconds**: wall time of the task, building its store included."
    )
    return [line + "\n" for line in lines]


def _data_table(results: Report) -> str:
    """Each task's split sizes and the accuracies an adapter has to beat."""
    headers = ["task", "classes", "train rows", "val rows", "test rows", "chance", "majority val", "majority test"]
    rows = []
    for name, r in by_task_name(results["tasks"]).items():
        base = r.get("baselines") or {}
        rows.append([name, len(r["classes"]), *(r["sizes"][s] for s in ("train", "val", "test")), base.get("chance"),
                     base.get("majority_val"), base.get("majority_test")])
    return ("## Data\n\n" + markdown_table(headers, rows)
            + "\nchance: 1 / classes (guessing uniformly); majority val / test: the accuracy of always answering the "
              "train split's most frequent class.\n")


def _spent(result: dict[str, Any]) -> str:
    """``spent/grid`` adapter-epochs of a task (the grid's alone when it trained every adapter throughout)."""
    spent, grid = result.get("adapter_epochs"), result.get("grid_adapter_epochs")
    return "-" if spent is None else f"{spent}/{grid}" if spent != grid else str(grid)


def render_results(results: Report) -> str:
    """``results.md``: the summary (:func:`render_summary`) then, per task, every adapter of its bank."""
    lines = [render_summary(results)]
    if results["tasks"]:
        lines += [*_legend(results), _data_table(results)]
    for name, r in by_task_name(results["tasks"]).items():
        lines.append(f"## {name}\n")
        lines += [f"Warning: {warning}.\n" for warning in r.get("warnings", [])]
        if r.get("directory") and "val_curve" in r["adapters"][0]:
            lines.append(f"![Training curves: each adapter's training loss and validation accuracy per epoch]"
                         f"({r['directory']}/{CURVES_PNG})\n")
        halving = bool(r.get("rungs"))
        if halving:
            lines.append(f"Successive halving: {r['adapter_epochs']} adapter-epochs of the full grid's "
                         f"{r['grid_adapter_epochs']} ({r['adapter_epochs'] / r['grid_adapter_epochs']:.0%}); "
                         "pruned adapters keep their best epoch before their rung, and the best on val of all "
                         "adapters is selected.\n")
            lines.append(markdown_table(
                ["rung", "after epoch", "entered", "pruned", "went on"],
                [[g["rung"], g["epoch"], g["entered"], g["entered"] - g["kept"], g["kept"]] for g in r["rungs"]],
            ))
        headers = ["layer", "lr", "wd", "queries", "heads", "mlp", "seed", "val acc", "test acc", "diverged"]
        rows = [[a["layer"], a["lr"], a["weight_decay"], a["num_queries"], a["num_heads"], a["mlp_ratio"], a["seed"],
                 a["val_acc"], a["test_acc"], "yes" if a["diverged"] else ""] for a in r["adapters"]]
        if halving:
            headers += ["epochs", "stopped at rung"]
            for row, a in zip(rows, r["adapters"]):
                row += [a["epochs_trained"], a["stopped_rung"] if a["stopped_rung"] is not None else ""]
        lines.append(markdown_table(headers, rows))
    return "\n".join(lines)


def written_files(results: Report) -> list[str]:
    """What the suite wrote under its output directory, as paths relative to it (a task's directory by pattern)."""
    files = [REPORT_JSON, REPORT_MD, f"<task>-<fingerprint>/{ADAPTER_DIR}/", f"<task>-<fingerprint>/{CURVES_PNG}"]
    if _has_ensembles(results):
        files.append(f"<task>-<fingerprint>/{ENSEMBLE_DIR}/")
    return files


def _has_halving(results: Report) -> bool:
    return any(r.get("search") == "halving" for r in results["tasks"].values())


def _asked_for_ensembles(results: Report) -> bool:
    return any(r.get("ensemble") for r in results["tasks"].values())


def _has_ensembles(results: Report) -> bool:
    """Whether an ensemble was saved for any task."""
    return any((r.get("ensemble") or {}).get("adapter_dir") for r in results["tasks"].values())

