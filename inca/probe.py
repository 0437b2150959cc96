"""Layer probing: which blocks of a frozen backbone hold the most useful representations for a task.

The registered probes (:mod:`inca.probes`) run on every layer from one backbone pass per batch
(:func:`inca.probes.run.run_probes`); this module runs them task after task, ranks each task's layers by every probe
that ran (:mod:`inca.probes.ranking`: val accuracy only, ties shown and broken by a stated rule), writes the
reports, and reads a report's rankings back for ``inca-train --layers best:K --rank-by PROBE``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backbone import Backbone, resolve_layers
from .errors import InCAError
from .io import atomic_write_text
from .probe_report import ProbeReport, read_probe_report
from .probes import ProbeSuiteConfig
from .probes.ranking import RANK_BY, best_count, check_rank_by, probe_keys, rank_by_probe, tied_with_best
from .probes.run import run_probes, usable_pools
from .progress import command_units
from .report import markdown_table, plot_heatmap, plot_lines
from .suite import Unit, finished_on_same_data, run_suite
from .tasks import Task, by_task_name, task_names
from .train.config import SearchConfig

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, REPORT_PNG, HEATMAP_PNG = "probe.json", "probe.md", "probe.png", "probe_heatmap.png"
TIE_RULE = ("equal val accuracy is a tie, broken by the probe's mean val accuracy over its poolings, then by the "
            "shallower layer")


def probe_task(
    backbone: Backbone, task: Task, layers: list[int], options: ProbeSuiteConfig
) -> dict[str, Any]:
    """Every chosen probe on every layer of ``task``: per probe/pool/layer val and test accuracy, each probe's
    best layers on val (ties included) and each probe's ranking of the layers (by val accuracy only)."""
    start = time.perf_counter()
    probed = run_probes(backbone, task, layers, options)
    results = probed.results
    return {
        "task": task.spec,
        "classes": task.classes,
        "sizes": task.sizes(),
        "layers": layers,
        "activations": probed.activations,
        "backbone_forward_calls": probed.backbone_forward_calls,
        "results": {key: {str(layer): value for layer, value in by_layer.items()} for key, by_layer in results.items()},
        "best_layers": {key: tied_with_best(by_layer) for key, by_layer in results.items()},
        "rankings": {name: rank_by_probe(results, name).to_dict() for name in options.probes},
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------------
# Suites, reports, and the bridge to inca-train
# ----------------------------------------------------------------------------------------------------


def probe_config(backbone: Backbone, layers: list[int], options: ProbeSuiteConfig) -> dict[str, Any]:
    """What must match for a finished task's probes to be reused by a rerun (not where activations come from,
    nor the memory budget). The InCA probe's epoch is recorded: reports that scored its last epoch, as inca once
    did, are of another configuration."""
    keep = {k: v for k, v in options.to_dict().items() if k not in ("memory_budget_gb", "cache_dir", "num_workers")}
    scored = {"inca_scored_at": "best-val-epoch"} if "inca" in options.probes else {}
    return {"backbone": backbone.fingerprint, "layers": layers, **SearchConfig.recorded(keep, prefix="inca_"), **scored}


def run_probe_suite(
    backbone: Backbone,
    task_specs: Sequence[str],
    layers_spec: str,
    options: ProbeSuiteConfig,
    out: str | os.PathLike,
    load_task: Callable[[str], Task],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Probe each task; the reports are rewritten atomically after each task, and a rerun with the same
    configuration skips the finished ones (another configuration needs ``overwrite``)."""
    layers = resolve_layers(layers_spec, backbone.num_blocks)
    usable_pools(backbone, options)  # before any data loads
    # Fingerprinted, so a finished task is skipped only as is; keyed by the canonical spec (one per task).
    tasks = {task.spec: task for task in map(load_task, task_specs)}

    def probe(task: Task) -> dict[str, Any]:
        return {**probe_task(backbone, task, layers, options), "fingerprint": task.fingerprint,
                "typed_spec": task.typed_spec}

    fresh = {"backbone": backbone.describe(), "config": probe_config(backbone, layers, options),
             "probes": options.probes, "tasks": {}}
    names = task_names(tasks)
    units = (Unit(spec, names[spec], functools.partial(probe, task)) for spec, task in tasks.items())
    with command_units(len(tasks)):  # redirected logs: progress lines per tenth of the tasks
        return run_suite(out, REPORT_JSON, fresh, units, write_reports, overwrite=overwrite,
                         finished=finished_on_same_data(tasks, "probed"))


def write_reports(out: Path, report: dict[str, Any]) -> None:
    """``probe.md`` and the plots of ``report`` (``probe.json``'s content, which the suite writes)."""
    atomic_write_text(out / REPORT_MD, render_probe_report(report))
    tasks = by_task_name(report["tasks"])

    def curves(split: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
        return {name: {key: ([int(k) for k in by_layer], [v[split] for v in by_layer.values()])
                       for key, by_layer in result["results"].items()} for name, result in tasks.items()}

    plot_lines(out / REPORT_PNG, curves("val"), xlabel="block index (depth)",
               ylabel="accuracy: val (solid, chooses the layer), test (dashed)",
               title=f"Layer probes of {report['backbone']['name']} (star: best on val, every tied layer)",
               marks={name: result["best_layers"] for name, result in tasks.items()}, dashed=curves("test"))
    if _has_heatmap(tasks):
        layers = next(iter(tasks.values()))["layers"]
        grid = np.array([[r["results"]["inca"][str(layer)]["val"] for layer in layers] for r in tasks.values()])
        plot_heatmap(out / HEATMAP_PNG, grid, list(tasks), [str(layer) for layer in layers],
                     title=f"InCA probe val accuracy (it ranks the layers; test: {REPORT_PNG}), "
                           f"{report['backbone']['name']}", xlabel="block index")


def _has_heatmap(tasks: dict[str, Any]) -> bool:
    """Whether the reports draw the tasks x layers heatmap of the InCA probe (two tasks or more, all probed by it)."""
    return len(tasks) > 1 and all("inca" in r["results"] for r in tasks.values())


def written_files(out_dir: str | os.PathLike, report: dict[str, Any]) -> list[str]:
    """What the suite wrote under ``out_dir`` for ``report`` (``probe.json``'s content), as paths relative to it."""
    files = [REPORT_MD, REPORT_JSON]
    if report["tasks"]:
        files += [REPORT_PNG, HEATMAP_PNG] if _has_heatmap(report["tasks"]) else [REPORT_PNG]
    return [name for name in files if (Path(out_dir) / name).is_file()]


def render_probe_report(report: dict[str, Any]) -> str:
    """Per task, a layers x probes table of val / test accuracy (bold: each probe's best layers on val, ties all
    bold) and each probe's ranking of the layers, with the one ``--layers best:K`` uses by default named."""
    backbone = report["backbone"]
    norm = ("through the backbone's final norm (as DINO's evaluation reads them)" if backbone.get("final_norm")
            else "as the block outputs them (no final norm)")
    lines = [f"# Layer probing: {backbone['name']} ({backbone['weights']} weights)\n",
             f"Last block's tokens: {norm}. Layers are chosen on val accuracy only: a probe with several poolings "
             f"scores a layer by its best pooling; {TIE_RULE}.\n"]
    for name, result in by_task_name(report["tasks"]).items():
        keys = list(result["results"])
        lines.append(f"## {name}\n")
        rows = []
        for layer in result["layers"]:
            row: list[Any] = [layer]
            for key in keys:
                score = result["results"][key][str(layer)]
                cell = f"{score['val']:.3f} / {score['test']:.3f}"
                row.append(f"**{cell}**" if layer in result["best_layers"][key] else cell)
            rows.append(row)
        lines.append(markdown_table(["layer", *[f"{k} (val / test)" for k in keys]], rows))
        lines.append("Layers ranked by each probe's val accuracy (`=`: a tie, `>`: better), for "
                     "`inca-train --layers best:K --rank-by PROBE`:\n")
        for name, ranking in result.get("rankings", {}).items():
            default = f" (`--rank-by` default: {RANK_BY})" if name == RANK_BY else ""
            lines.append(f"- {name}{default}: {ranking['ranked']}")
        lines.append("")
    return "\n".join(lines)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per task and probe: the best layer on val (and those tied with it) and its accuracy."""
    lines = []
    for name, result in by_task_name(report["tasks"]).items():
        for key, best in result["best_layers"].items():
            score = result["results"][key][str(best[0])]
            tied = f" (tied with {', '.join(map(str, best[1:]))})" if len(best) > 1 else ""
            lines.append(f"{name}: {key:<12} best layer {best[0]:>3}  val {score['val']:.3f}  "
                         f"test {score['test']:.3f}{tied}")
    return lines


def layers_from_report(
    spec: str, num_blocks: int, report: str | os.PathLike | ProbeReport | None, rank_by: str = RANK_BY
) -> Callable[[Task], list[int]]:
    """Layers to train per task: a plain layer spec, or ``best:K``, the K layers that ``rank_by``'s probe ranked
    best on val for that task in an ``inca-probe`` report."""
    count = best_count(spec)
    if count is None:
        layers = resolve_layers(spec, num_blocks)
        return lambda task: layers
    if not report:
        raise InCAError(f"--layers {spec} needs --probe-report OUT/probe.json (written by inca-probe)")
    try:
        check_rank_by(rank_by)
    except argparse.ArgumentTypeError as exc:
        raise InCAError(f"--rank-by: {exc}") from None
    tasks = _read_results(report)
    for spec, results in tasks.items():  # before any task trains
        if not probe_keys(results, rank_by):
            raise InCAError(f"probe report {report} has no {rank_by} probe results for {spec!r} (it has "
                            f"{', '.join(results)}): pass --rank-by with one of those probes, or probe again with "
                            f"--probes {rank_by}")

    def best_layers(task: Task) -> list[int]:
        if task.spec not in tasks:
            raise InCAError(f"probe report {report} has no task {task.spec!r} (it has {', '.join(tasks) or 'none'})")
        ranking = rank_by_probe(tasks[task.spec], rank_by)
        chosen = resolve_layers(ranking.best(count), num_blocks)
        logger.info("%s: training on the %d best layers on val by the %s probe, %s (ranked %s)", task.name,
                    len(chosen), rank_by, chosen, ranking.text)
        return chosen

    return best_layers


def _read_results(report: str | os.PathLike | ProbeReport) -> dict[str, dict[str, Any]]:
    """Each task's probe results in the ``inca-probe`` report ``report``; a file that is not one (missing, not
    JSON, not a report, a task without its results) is refused in one line. Keyed by canonical spec."""
    tasks = read_probe_report(report)["tasks"]
    for spec, result in tasks.items():
        results = result.get("results") if isinstance(result, dict) else None
        if not isinstance(results, dict) or not results or not all(map(_is_scored, results.values())):
            raise InCAError(f"probe report {report}: task {spec!r} has no valid probe results; probe it again with "
                            "inca-probe")
    return {spec: result["results"] for spec, result in tasks.items()}


def _is_scored(by_layer: Any) -> bool:
    """``{layer: {"val": number, ...}}`` with integer layers, as a probe report holds a probe's results."""
    return (isinstance(by_layer, dict) and bool(by_layer)
            and all(_is_layer(layer) and isinstance(score, dict) and isinstance(score.get("val"), (int, float))
                    and not isinstance(score.get("val"), bool) for layer, score in by_layer.items()))


def _is_layer(text: Any) -> bool:
    return isinstance(text, str) and text.lstrip("-").isdigit()
