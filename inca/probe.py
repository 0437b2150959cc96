"""Layer probing: which blocks of a frozen backbone hold the most useful representations for a task.

One backbone pass per batch feeds every layer's probes: a :class:`~inca.activations.RecordingSource` wraps
the activation source (a matching store when one exists, else the live backbone; probing never builds a store)
and, the first time it serves a split's rows, records what the probes need: pooled features (CLS token, mean
of patch tokens) for the probes on pooled features (linear, kNN), and, within a memory budget, the tokens
themselves so that further epochs of a probe training on tokens (InCA) cost no backbone pass. The probes are
the registered ones (:mod:`inca.probes`); this module runs them, task after task, and writes the reports.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .activations import CachedSource, LiveSource, RecordingSource, open_source
from .backbone import Backbone, resolve_layers
from .cache import store_bytes
from .errors import InCAError
from .io import atomic_write_text
from .probe_report import read_probe_report
from .probes import ProbeSuiteConfig, get_probe
from .progress import command_units
from .report import markdown_table, plot_heatmap, plot_lines
from .suite import Unit, finished_on_same_data, run_suite
from .tasks import SPLITS, Task
from .train.config import SearchConfig

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, REPORT_PNG, HEATMAP_PNG = "probe.json", "probe.md", "probe.png", "probe_heatmap.png"


def probe_task(
    backbone: Backbone, task: Task, layers: list[int], options: ProbeSuiteConfig
) -> dict[str, Any]:
    """Every chosen probe on every layer of ``task``; returns per probe/pool/layer val and test accuracy.

    Probes training on tokens run first (their passes over the data also record the pooled features), then the
    probes on pooled features, once per pooling. The layers are ranked by the token probes when any ran (they
    train what ``inca-train`` trains), else by every probe's mean val accuracy."""
    start = time.perf_counter()
    run = options.run
    pools = usable_pools(backbone, options)
    if len(pools) < len(run.pools):
        logger.info("%s has no CLS token: the cls pool is skipped", backbone.name)
    # epochs only weighs building a store, which "reuse" never does; a store of any dtype is read as it is.
    source = open_source(backbone, task, layers, epochs=1, cache="reuse", cache_dir=run.cache_dir, dtype=None,
                         num_workers=run.num_workers)
    # Tokens are kept as float16, exactly the size of a float16 store of these layers.
    keep = isinstance(source, LiveSource) and store_bytes(backbone, task, layers) <= run.memory_budget_gb * 1e9
    probes = [get_probe(name) for name in options.probes]
    token_probes = [probe for probe in probes if probe.reads == "tokens"]
    pooled_probes = [probe for probe in probes if probe.reads == "pooled"]
    recorded_pools = pools if pooled_probes else []
    probe_source = RecordingSource(source, recorded_pools, backbone.num_prefix_tokens, keep_tokens=keep)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for probe in token_probes:
        results[probe.name] = probe.fit(probe_source, backbone, task, layers, options.configs[probe.name], run)
    if pooled_probes:
        features = {pool: {split: {layer: probe_source.pooled(split, layer, pool) for layer in layers}
                           for split in SPLITS} for pool in pools}
        labels = {split: task.splits[split].labels for split in SPLITS}
        for probe in pooled_probes:
            for pool in pools:
                scores = probe.fit(features[pool], labels, task.num_classes, options.configs[probe.name], run)
                results[f"{probe.name}/{pool}"] = {layer: scores[layer] for layer in layers}
    rankers = [probe.name for probe in token_probes] or list(results)
    forward_calls = source.forward_calls if isinstance(source, LiveSource) else 0
    return {
        "task": task.spec,
        "classes": task.classes,
        "sizes": task.sizes(),
        "layers": layers,
        "activations": "cache" if isinstance(source, CachedSource) else "live",
        "backbone_forward_calls": forward_calls,
        "results": {key: {str(layer): value for layer, value in by_layer.items()} for key, by_layer in results.items()},
        "best_layers": {key: rank_layers(by_layer) for key, by_layer in results.items()},
        "ranking": _mean_ranking({key: results[key] for key in rankers}),
        "seconds": time.perf_counter() - start,
    }


def usable_pools(backbone: Backbone, options: ProbeSuiteConfig) -> list[str]:
    """The requested pools the backbone has tokens for (without a class token there is no cls pool); refused in
    one line when the pooled probes asked for would be left with none."""
    pools = [p for p in options.run.pools if p != "cls" or backbone.token_layout["cls_token"]]
    pooled = [name for name in options.probes if get_probe(name).reads == "pooled"]
    if not pools and pooled:
        raise InCAError(f"{backbone.name} has no class token, so the {', '.join(pooled)} probe(s) cannot pool it: "
                        "use --pool mean (or --probes with token probes only, such as inca)")
    return pools


def rank_layers(by_layer: dict[int, dict[str, float]]) -> list[int]:
    """Layers by validation accuracy, best first (ties: the shallower layer, cheaper to reach)."""
    return sorted(by_layer, key=lambda layer: (-by_layer[layer]["val"], layer))


def _mean_ranking(results: dict[str, dict[int, dict[str, float]]]) -> list[int]:
    layers = next(iter(results.values())).keys()
    mean = {layer: {"val": float(np.mean([r[layer]["val"] for r in results.values()]))} for layer in layers}
    return rank_layers(mean)


# ----------------------------------------------------------------------------------------------------
# Suites, reports, and the bridge to inca-train
# ----------------------------------------------------------------------------------------------------


def probe_config(backbone: Backbone, layers: list[int], options: ProbeSuiteConfig) -> dict[str, Any]:
    """What must match for a finished task's probes to be reused by a rerun (not where activations come from,
    nor the memory budget)."""
    keep = {k: v for k, v in options.to_dict().items() if k not in ("memory_budget_gb", "cache_dir", "num_workers")}
    return {"backbone": backbone.fingerprint, "layers": layers, **SearchConfig.recorded(keep, prefix="inca_")}


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
    units = (Unit(spec, spec, functools.partial(probe, task)) for spec, task in tasks.items())
    with command_units(len(tasks)):  # redirected logs: progress lines per tenth of the tasks
        return run_suite(out, REPORT_JSON, fresh, units, write_reports, overwrite=overwrite,
                         finished=finished_on_same_data(tasks, "probed"))


def write_reports(out: Path, report: dict[str, Any]) -> None:
    """``probe.md`` and the plots of ``report`` (``probe.json``'s content, which the suite writes)."""
    atomic_write_text(out / REPORT_MD, render_probe_report(report))
    tasks = report["tasks"]
    panels = {
        spec: {key: ([int(k) for k in by_layer], [v["test"] for v in by_layer.values()])
               for key, by_layer in result["results"].items()}
        for spec, result in tasks.items()
    }
    marks = {spec: {key: ranked[0] for key, ranked in result["best_layers"].items()} for spec, result in tasks.items()}
    plot_lines(out / REPORT_PNG, panels, xlabel="block index (depth)", ylabel="test accuracy",
               title=f"Layer probes of {report['backbone']['name']} (star: best layer on val)", marks=marks)
    if _has_heatmap(tasks):
        layers = next(iter(tasks.values()))["layers"]
        grid = np.array([[r["results"]["inca"][str(layer)]["test"] for layer in layers] for r in tasks.values()])
        plot_heatmap(out / HEATMAP_PNG, grid, list(tasks), [str(layer) for layer in layers],
                     title=f"InCA probe test accuracy, {report['backbone']['name']}", xlabel="block index")


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
    """Per task, a layers x probes table of val / test accuracy; the best layer of each probe in bold."""
    backbone = report["backbone"]
    norm = ("through the backbone's final norm (as DINO's evaluation reads them)" if backbone.get("final_norm")
            else "as the block outputs them (no final norm)")
    lines = [f"# Layer probing: {backbone['name']} ({backbone['weights']} weights)\n",
             f"Last block's tokens: {norm}.\n"]
    for spec, result in report["tasks"].items():
        keys = list(result["results"])
        lines.append(f"## {spec}\n")
        rows = []
        for layer in result["layers"]:
            row: list[Any] = [layer]
            for key in keys:
                score = result["results"][key][str(layer)]
                cell = f"{score['val']:.3f} / {score['test']:.3f}"
                row.append(f"**{cell}**" if result["best_layers"][key][0] == layer else cell)
            rows.append(row)
        lines.append(markdown_table(["layer", *[f"{k} (val / test)" for k in keys]], rows))
        lines.append(f"\nbest layers (for `inca-train --layers best:K`): {result['ranking'][:8]}\n")
    return "\n".join(lines)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per task and probe: the best layer and its accuracy."""
    lines = []
    for spec, result in report["tasks"].items():
        for key, ranked in result["best_layers"].items():
            score = result["results"][key][str(ranked[0])]
            lines.append(
                f"{spec}: {key:<12} best layer {ranked[0]:>3}  val {score['val']:.3f}  test {score['test']:.3f}"
            )
    return lines


def layers_from_report(spec: str, num_blocks: int, report: str | None) -> Callable[[Task], list[int]]:
    """Layers to train per task: a plain layer spec, or ``best:K``, the K best-ranked layers that an
    ``inca-probe`` report found for that task."""
    if not spec.strip().lower().startswith("best:"):
        layers = resolve_layers(spec, num_blocks)
        return lambda task: layers
    try:
        count = int(spec.split(":", 1)[1])
    except ValueError:
        raise InCAError(f"--layers {spec!r}: use best:K with K a positive integer") from None
    if count < 1:
        raise InCAError(f"--layers {spec!r}: K must be at least 1")
    if not report:
        raise InCAError(f"--layers {spec} needs --probe-report OUT/probe.json (written by inca-probe)")
    tasks = _read_rankings(report)

    def best_layers(task: Task) -> list[int]:
        if task.spec not in tasks:
            raise InCAError(f"probe report {report} has no task {task.spec!r} (it has {', '.join(tasks) or 'none'})")
        ranking = tasks[task.spec]
        chosen = resolve_layers(ranking[:count], num_blocks)
        logger.info("%s: training on the %d best probed layers %s", task.spec, len(chosen), chosen)
        return chosen

    return best_layers


def _read_rankings(report: str) -> dict[str, list[int]]:
    """Each task's layer ranking (best first) in the ``inca-probe`` report ``report``; a file that is not one
    (missing, not JSON, not a report, a task without its ranking) is refused in one line. Keyed by canonical spec."""
    tasks = read_probe_report(report)["tasks"]
    rankings = {}
    for spec, result in tasks.items():
        ranking = result.get("ranking") if isinstance(result, dict) else None
        if not isinstance(ranking, list) or not ranking or not all(_is_int(layer) for layer in ranking):
            raise InCAError(f"probe report {report}: task {spec!r} has no valid layer ranking; probe it again with "
                            "inca-probe")
        rankings[spec] = ranking
    return rankings


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

