"""The comparison harness: methods x tasks on one backbone, with the same splits, batches and seed for all.

One protocol for every method (:func:`protocol`, recorded in ``compare.json`` and printed under the tables):
test accuracy at the epoch with the best validation accuracy (InCA included: each adapter keeps its best
epoch); the new head of the end-to-end methods started the same way for all (``--head-init``, default a
linear probe); the same augmentation or none (``--augment``); each method's learning rate tuned on
validation over the same number of values (``--lr-grid``); and the backbone's final norm on the last block's
tokens or not (``Backbone.final_norm``).

For each (task, method) it records test accuracy, that validation accuracy, the tuned values, trainable
parameters (count and % of the backbone's), wall seconds, peak memory, steps, the per-step training loss, its
training curves (each epoch's mean loss and validation accuracy; with ``--log-dir`` also in TensorBoard) and, per
task, each method's steps to a common training loss (:mod:`inca.convergence`), then rewrites
``compare.json`` (atomically), ``compare.md``, ``compare_accuracy_vs_params.png``,
``compare_loss.png`` and each task's ``runs/<task>-<fingerprint>/curves.png``. A rerun into the same directory
skips every pair already in ``compare.json`` with the same task data and hyper-parameters, so an interrupted comparison
loses at most the pair that was running.

Peak memory (:class:`inca.memory.PeakMemory`) is each method's own footprint, measured from a reset just
before it. Methods train their own copy of the backbone, which that growth includes; a method that runs on the
shared live backbone (``Method.shares_backbone``: ``inca``) gets the backbone's weight bytes added, so both
count the weights once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from inca.activations import ImageBatches, TensorBatches
from inca.adapters.common import (
    backbone_parameter_count,
    describe_trainable,
    percent_text,
    set_trainable,
    trainable_percent,
)
from inca.backbone import Backbone
from inca.convergence import convergence_lines, convergence_table
from inca.io import atomic_write_text, digest
from inca.memory import PeakMemory, parameter_bytes
from inca.methods import METHODS, Method, MethodResult, RunConfig, TrainConfig, budget, run_method
from inca.methods.base import LR_STEP
from inca.outputs import COMPARE_REPORT
from inca.progress import command_units
from inca.report import fmt, markdown_table, plot_curves, plot_scatter, save_figure
from inca.suite import Unit, run_suite, spelling_of, task_directory
from inca.tasks import SPLITS, Task, by_task_name, load_task, task_names
from inca.train.e2e import FitConfig, fit, trainable_copy
from inca.train.runner import ADAPTER_DIR
from inca.training_log import TrainingLog, scope

__all__ = [
    "ACCURACY_PNG",
    "CURVES_PNG",
    "LOSS_PNG",
    "REPORT_JSON",
    "REPORT_MD",
    "RUNS_DIR",
    "protocol",
    "protocol_lines",
    "render_markdown",
    "run_comparison",
    "write_reports",
    "written_files",
]

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD = COMPARE_REPORT, "compare.md"
ACCURACY_PNG, LOSS_PNG = "compare_accuracy_vs_params.png", "compare_loss.png"
CURVES_PNG = "curves.png"  # per task, in its RUNS_DIR directory
RUNS_DIR = "runs"  # each (task, method)'s own files: RUNS_DIR/<task>-<fingerprint>/<method>/ (adapters, PEFT exports)
FORMAT_VERSION = 1


def _warm_up(backbone: Backbone, task: Task, settings: RunConfig) -> None:
    """One unmeasured fine-tuning step and evaluation on one batch, so one-time lazy allocations (kernel
    and primitive caches, thread pools, cuBLAS workspaces) are not charged to whichever method runs first."""
    images = ImageBatches(task, backbone, settings.num_workers)
    batch = next(iter(images.loader("train", [np.arange(min(settings.batch_size, images.num_rows("train")))])))
    data = TensorBatches({split: batch[0] for split in SPLITS}, {split: batch[1] for split in SPLITS})
    with torch.random.fork_rng(devices=[backbone.device] if backbone.device.type == "cuda" else []):
        model = trainable_copy(backbone, task.num_classes)
    set_trainable(model, model.parameters())
    fit(model, data, FitConfig(epochs=1, batch_size=settings.batch_size, progress=False, desc="warm-up"))


def protocol(backbone: Backbone, settings: RunConfig, equal_budget: bool = False) -> dict[str, Any]:
    """How every method is trained and selected: what ``compare.json`` records and ``compare.md`` prints."""
    return {"model_selection": "best-val-epoch", **settings.protocol(), "final_norm": backbone.final_norm,
            "equal_budget": equal_budget}


def protocol_lines(protocol: Mapping[str, Any]) -> list[str]:
    """The protocol in words, one line each; which methods a line singles out comes from the registry (those on
    the shared backbone, on features computed once, tuning more than their learning rate)."""
    head = {
        "linear-probe": "fitted on the frozen features first (the linear method's fit), then trained on "
                        "(linear-probe-then-fine-tune)",
        "random": "timm's random draw",
        "zero": "zeros (no gradient reaches the backbone at step 0; LoRA-GA then has nothing to approximate)",
    }[protocol["head_init"]]  # fmt: skip
    sharing = _method_names(_on_shared_backbone)
    features = _method_names(lambda method: method.features_only)
    tuning = _method_names(lambda method: getattr(method.config, "tuning_grid", None) not in (
        None, TrainConfig.tuning_grid))  # fmt: skip
    grid = protocol["lr_grid"]
    lr = ("each method's default" if grid == 1 else f"tuned on val over {grid} values x{LR_STEP:g} apart around "
          f"each method's default ({tuning} with the other values their authors tune; {sharing} in its bank); the "
          "chosen values are shown")
    return [
        f"- model selection: every method reports the test accuracy of its best-validation epoch ({sharing}: each "
        "adapter's best epoch, then the best adapter on val)",
        f"- new head of the end-to-end methods: {head}",
        "- augmentation: " + (f"timm's training transform on the train split ({sharing} streams live activations; "
                              f"{features}'s features are computed once, un-augmented)"
                              if protocol["augment"] else "none"),
        f"- learning rate: {lr}",
        "- tuning budget: " + (f"equal, {grid} trained configuration(s) per method and task (a method's other tuned "
                               f"axes at their defaults; {sharing}'s layers the best on val by a linear probe run on "
                               "train and val)" if protocol.get("equal_budget") else
                               "each method's own; the configurations column counts what each trained per task"),
        f"- last block's tokens ({sharing}): " + ("through the backbone's final norm, as DINO's evaluation reads them"
                                                  if protocol["final_norm"]
                                                  else "as the block outputs them (no final norm)"),
    ]


def _method_names(chosen: Callable[[Method], bool]) -> str:
    """The registered methods ``chosen`` picks, comma-separated."""
    return ", ".join(name for name, method in METHODS.items() if chosen(method))


def _on_shared_backbone(method: Method) -> bool:
    """A method that runs on the shared live backbone (a bank, charged the backbone's weights' memory)."""
    return method.shares_backbone


def _run_config(backbone: Backbone, settings: RunConfig, equal_budget: bool = False) -> dict[str, Any]:
    """What must match for results to share a comparison (tasks and methods may grow across reruns; an equal
    budget is recorded only when on, as reports before it had none)."""
    return {
        **({"equal_budget": True} if equal_budget else {}),
        "backbone": backbone.name,
        "weights": backbone.weights,
        "backbone_fingerprint": backbone.fingerprint,
        "device": backbone.device.type,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        **settings.protocol(),
    }


def run_comparison(
    backbone: Backbone,
    task_specs: Sequence[str],
    methods: Mapping[str, Mapping[str, Any]],
    settings: RunConfig,
    out_dir: str | os.PathLike,
    load: Callable[[str], Task] = load_task,
    overwrite: bool = False,
    log: TrainingLog | None = None,
    equal_budget: bool = False,
) -> dict[str, Any]:
    """Run every method (name -> full hyper-parameters, see :func:`inca.methods.resolve_methods`) on
    every task (loaded once by ``load`` and shared), writing results and reports after each pair; with ``log``
    each method's epochs also go to TensorBoard, under ``<task directory>/<method>``.

    Returns the content of ``compare.json``. Pairs already there (same task data, method, hyper-parameters)
    are skipped; a ``compare.json`` made with another backbone, device, epochs, batch size or seed is an error
    unless ``overwrite``. With ``equal_budget`` every method trains ``settings.lr_grid`` configurations per task
    (:func:`inca.methods.budget.equal_budget`); each record counts the configurations its method trained.
    """
    out = Path(out_dir)
    if equal_budget:
        methods = budget.equal_budget(methods, settings, backbone.num_blocks)
    run_pair = _PairRunner(backbone, settings, out / RUNS_DIR, log)
    with command_units(len(task_specs) * len(methods)):  # redirected logs: progress lines per tenth of the pairs
        return run_suite(out, REPORT_JSON, _fresh_report(backbone, settings, run_pair.backbone_params, equal_budget),
                         _units(task_specs, methods, load, run_pair), write_reports, overwrite=overwrite,
                         finished=_finished, store=_store)


class _PairRunner:
    """Runs one (task, method) pair and returns its ``compare.json`` record. The first pair is preceded by an
    unmeasured warm-up (:func:`_warm_up`); each method's files go to ``runs_dir/<task>-<fingerprint>/<method>``."""

    def __init__(self, backbone: Backbone, settings: RunConfig, runs_dir: Path, log: TrainingLog | None) -> None:
        self.backbone, self.settings, self.runs_dir, self.log = backbone, settings, runs_dir, log
        self.backbone_params = backbone_parameter_count(backbone.model)
        self.backbone_bytes = parameter_bytes(backbone.model)
        self.warm = False

    def __call__(self, task: Task, name: str, hparams: dict[str, Any], key: str) -> dict[str, Any]:
        if not self.warm:
            _warm_up(self.backbone, task, self.settings)
            self.warm = True
        logger.info("%s on %s: training", name, task.name)
        with PeakMemory(self.backbone.device) as memory:
            start = time.perf_counter()
            with scope(self.log, f"{task_directory(task)}/{name}") as log:
                result = run_method(name, self.backbone, task, hparams, self.settings,
                                    self.runs_dir / task_directory(task) / name, log=log)
            seconds = time.perf_counter() - start
        peak = memory.peak_bytes
        if peak is not None and METHODS[name].shares_backbone:
            peak += self.backbone_bytes
        record = _record(task, name, hparams, key, result, seconds, peak, self.backbone_params)
        record["configurations"] = budget.trained_configurations(name, hparams, self.settings,
                                                                 self.backbone.num_blocks)
        logger.info("%s on %s: test accuracy %.4f (val %.4f), %s, %.1f s", name, task.name, record["test_acc"],
                    record["val_acc"], describe_trainable(record["trainable_params"], self.backbone_params), seconds)
        return record


def _record(
    task: Task, name: str, hparams: dict[str, Any], key: str, result: MethodResult, seconds: float,
    peak: int | None, backbone_params: int,
) -> dict[str, Any]:  # fmt: skip
    """One pair's ``compare.json`` record: the figures every method has, then its result's own."""
    record = {
        "task": task.spec,
        "typed_spec": task.typed_spec,
        "method": name,
        "test_acc": result.test_acc,
        "val_acc": result.val_acc,
        "best_epoch": result.best_epoch,
        "trainable_params": result.trainable_params,
        "trainable_pct": trainable_percent(result.trainable_params, backbone_params),
        "seconds": seconds,
        "peak_memory_mb": None if peak is None else peak / 2**20,
        "steps": result.steps,
        "tuned": result.tuned,
        "hparams": hparams,
        "task_info": {"classes": task.num_classes, "sizes": task.sizes(), "fingerprint": task.fingerprint,
                      "directory": task_directory(task)},
        "key": key,
        # the trained model in inca's format, relative to the output directory: what inca-predict --run serves
        "adapter_dir": f"{RUNS_DIR}/{task_directory(task)}/{name}/{ADAPTER_DIR}",
    }
    record.update({k: v for k, v in result.to_dict().items() if k not in record})
    return record


def _units(
    task_specs: Sequence[str], methods: Mapping[str, Mapping[str, Any]], load: Callable[[str], Task],
    run_pair: _PairRunner,
) -> Iterator[Unit]:  # fmt: skip
    """One unit per (task, method), task-major; a task is loaded once, when its first pair comes up. A pair's key
    covers the task's data, the method and its hyper-parameters (as JSON reads them back)."""
    for spec in task_specs:
        task = load(spec)
        for name, hparams in methods.items():
            hparams = json.loads(json.dumps(dict(hparams)))
            key = digest({"task": task.fingerprint, "method": name, "hparams": hparams})
            yield Unit(key, f"{name} on {task.name}", functools.partial(run_pair, task, name, hparams, key))


def _fresh_report(backbone: Backbone, settings: RunConfig, backbone_params: int,
                  equal_budget: bool = False) -> dict[str, Any]:
    """``compare.json`` before any pair has run."""
    return {
        "format_version": FORMAT_VERSION,
        "config": _run_config(backbone, settings, equal_budget),
        "backbone": backbone.describe(),
        "backbone_params": backbone_params,
        "memory": PeakMemory(backbone.device).measures,
        "protocol": protocol(backbone, settings, equal_budget),
        "results": [],
    }


def _finished(summary: dict[str, Any], key: str) -> bool:
    return any(r["key"] == key for r in summary["results"])


def _store(summary: dict[str, Any], key: str, record: dict[str, Any]) -> None:
    """Replace the same (task, method) in place (hyper-parameters changed, or the task recorded under another
    spelling of its spec by an inca version before canonical specs), else append; then the convergence
    figures of every task (:func:`~inca.convergence.convergence_table`)."""
    results = summary["results"]
    for i, old in enumerate(results):
        if old["method"] == record["method"] and spelling_of(old["task"], record["task"]):
            results[i] = record
            break
    else:
        results.append(record)
    summary["convergence"] = convergence_table([summary])


def _by_task(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records of each task, keyed by the name it shows in the reports (:func:`~inca.tasks.task_names`)."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    for record in results:
        tasks.setdefault(record["task"], []).append(record)
    return by_task_name(tasks)


def render_markdown(summary: Mapping[str, Any]) -> str:
    """``compare.md``: the settings, one table per task, the hyper-parameters each method ran with."""
    config = summary["config"]
    lines = [
        f"# Comparison on {config['backbone']} ({config['weights']} weights)",
        "",
        f"{config['epochs']} epochs, batch size {config['batch_size']}, seed {config['seed']}, device "
        f"{config['device']}. Test accuracy is measured once, at the epoch with the best validation accuracy. "
        f"Trainable parameters include the classification head; % is of the backbone's "
        f"{summary['backbone_params']:,} parameters. Peak memory: {summary['memory']}, plus the backbone's "
        f"weights for methods that run on the shared backbone ({_method_names(_on_shared_backbone)}).",
    ]
    headers = ["method", "test acc", "val acc", "best epoch", "chosen", "configurations", "trainable params",
               "% of backbone", "seconds", "peak memory (MB)", "steps"]
    hparams: dict[str, dict[str, Any]] = {}
    for task, records in _by_task(summary["results"]).items():
        info = records[0]["task_info"]
        sizes = ", ".join(f"{split} {n}" for split, n in info["sizes"].items())
        rows = [
            [r["method"], r["test_acc"], r["val_acc"], r.get("best_epoch"), _chosen(r.get("tuned")),
             _configurations(r.get("configurations")), f"{r['trainable_params']:,}", percent_text(r["trainable_pct"]),
             r["seconds"], r["peak_memory_mb"],
             r["steps"]]
            for r in records
        ]  # fmt: skip
        lines += ["", f"## {task} ({info['classes']} classes; {sizes})", "", markdown_table(headers, rows).rstrip()]
        png = _curves_png(records)
        if png:
            lines += ["", f"![Training curves: each method's training loss and validation accuracy per epoch]({png})"]
        cached = [r["method"] for r in records if r.get("activations") == "cache"]
        if cached:
            lines += ["", f"{', '.join(cached)} read an activation store: its seconds include building it only if "
                          "no earlier run had built it."]
        ranked = [f"{r['method']}'s layers: {r['hparams']['layers']}, ranked on val by the "
                  f"{r['layer_ranking']['rank_by']} probe: {r['layer_ranking']['ranked']}"
                  for r in records if r.get("layer_ranking")]
        if ranked:
            lines += ["", *ranked]
        hparams.update({r["method"]: r["hparams"] for r in records})
    if summary["results"]:
        table = summary.get("convergence") or convergence_table([summary])  # stored by _store; older reports lack it
        names = task_names(table["tasks"])
        lines += ["", "## Convergence", "", *convergence_lines(
            {**table, "tasks": {names[spec]: entry for spec, entry in table["tasks"].items()}})]
    if "protocol" in summary:
        lines += ["", "## Protocol", "", *protocol_lines(summary["protocol"])]
        if summary["protocol"]["lr_grid"] > 1:
            lines += ["", "Seconds and peak memory cover every grid point a method trained; steps are those of the "
                          "chosen run."]
    lines += ["", "## Hyper-parameters", ""]
    lines += [f"- `{m}`: " + ", ".join(f"{k}={fmt(v)}" for k, v in hp.items()) for m, hp in hparams.items()]
    return "\n".join(lines) + "\n"


def _chosen(tuned: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in tuned.items()) if tuned else ""


def _configurations(counted: Mapping[str, Any] | None) -> str:
    """``12 (lr 3 x layers 4)``: a record's trained configurations and their axes (a dash in older reports)."""
    if counted is None:
        return "-"
    axes = " x ".join(f"{axis} {size}" for axis, size in counted["axes"].items())
    return f"{counted['total']} ({axes})" if axes else str(counted["total"])


def _plot_losses(path: Path, summary: Mapping[str, Any]) -> None:
    tasks = _by_task(summary["results"])
    fig = Figure(figsize=(7.5, 3.4 * len(tasks)))
    for ax, (task, records) in zip(fig.subplots(len(tasks), 1, squeeze=False)[:, 0], tasks.items()):
        for r in records:
            curve = r.get("loss_curve")
            if curve:  # one point per step, or per epoch (inca): spread over the run's steps
                x = [(i + 1) * r["steps"] / len(curve) for i in range(len(curve))]
                ax.plot(x, curve, linewidth=1, marker="o" if len(curve) < 30 else None, markersize=3,
                        label=r["method"])
        ax.set_title(f"training loss per step: {task}")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def write_reports(out_dir: str | os.PathLike, summary: Mapping[str, Any]) -> str:
    """Write ``compare.md`` and both plots from ``summary`` (``compare.json``'s content); return the Markdown."""
    out = Path(out_dir)
    text = render_markdown(summary)
    atomic_write_text(out / REPORT_MD, text)
    if summary["results"]:
        per_method: dict[str, list[dict[str, Any]]] = {}
        for r in summary["results"]:
            per_method.setdefault(r["method"], []).append(r)
        n_tasks = len(_by_task(summary["results"]))
        points = {
            m: (sum(r["trainable_params"] for r in rs) / len(rs), sum(r["test_acc"] for r in rs) / len(rs))
            for m, rs in per_method.items()
        }
        title = "test accuracy vs trainable parameters" + (f" (mean over {n_tasks} tasks)" if n_tasks > 1 else "")
        plot_scatter(out / ACCURACY_PNG, points, "trainable parameters (log scale)", "test accuracy", title)
        _plot_losses(out / LOSS_PNG, summary)
        _plot_curves(out, summary)
    return text


def _curves_png(records: Sequence[Mapping[str, Any]]) -> str | None:
    """Where the plot of a task's training curves goes, relative to the output directory (None: its records have
    no curves, or do not name the task's directory)."""
    directory = records[0]["task_info"].get("directory")
    if directory is None or not any("epoch_loss" in r for r in records):
        return None
    return f"{RUNS_DIR}/{directory}/{CURVES_PNG}"


def _plot_curves(out: Path, summary: Mapping[str, Any]) -> None:
    """One figure per task: each method's training loss and validation accuracy per epoch, its best epoch starred."""
    for task, records in _by_task(summary["results"]).items():
        path, runs = _curves_png(records), [r for r in records if "epoch_loss" in r]
        if path is not None:
            plot_curves(out / path, {"training loss": {r["method"]: r["epoch_loss"] for r in runs},
                                     "validation accuracy": {r["method"]: r["val_curve"] for r in runs}},
                        f"{task}: training curves (star: the epoch each method is reported at)",
                        marks={r["method"]: r["best_epoch"] for r in runs})


def written_files(out_dir: str | os.PathLike, summary: Mapping[str, Any]) -> list[str]:
    """What the comparison wrote under ``out_dir``, as paths relative to it (the methods' own files by pattern)."""
    files = [REPORT_MD, REPORT_JSON]
    if summary["results"]:
        files += [ACCURACY_PNG, LOSS_PNG, f"{RUNS_DIR}/<task>-<fingerprint>/{CURVES_PNG}"]
    if any(path.is_dir() for path in Path(out_dir, RUNS_DIR).glob("*/*")):
        files.append(f"{RUNS_DIR}/<task>-<fingerprint>/<method>/")
    return files
