"""Turn the proxy-backbone runs into ``docs/results.md`` (tables), its two PNGs, ``docs/results.json`` (every figure
the claims and README quote) and README's results block.

Reads what the commands in :data:`COMMANDS` wrote (run them first, from the repository root): the proxy's
``config.json`` (tools/pretrain_proxy.py), the ``inca-compare`` output of recipes/proxy-compare.yaml, three
``inca-probe`` reports on the demo tasks (the proxy, the same architecture with random weights, and the proxy's
last block through its final norm), and the proxy against random weights on data its recipe never saw
(tools/make_photo_task.py: a linear probe each, and recipes/proxy-skimage.yaml at three seeds each), the
comparison again at an equal tuning budget (``inca-compare --equal-budget``), and the ``--json`` figures of
tools/bench_activations.py (test accuracy from stores of each element type) and tools/bench_search.py (successive
halving against the grid), on the demo backbone and on the proxy. A missing input stops it, naming the file.

README.md's paragraph between :data:`README_BEGIN` and :data:`README_END` is rendered from docs/results.json by
:func:`readme_block`, as are the claims in docs/results.md (:func:`claims_lines`, :func:`independent_lines`), so
the two cannot say different things; tests/test_results_doc.py checks both files against the JSON.

    python tools/proxy_results.py
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from inca.adapters.common import percent_text
from inca.compare import ACCURACY_PNG as COMPARE_ACCURACY_PNG
from inca.compare import REPORT_JSON as COMPARE_JSON
from inca.compare import protocol_lines
from inca.convergence import DEFAULT_WINDOW, convergence_lines, convergence_table, smoothed_loss
from inca.io import atomic_write_json, atomic_write_text, read_json
from inca.probe import REPORT_JSON as PROBE_JSON
from inca.probe import render_probe_report
from inca.report import fmt, markdown_table, save_figure
from inca.tasks import by_task_name

TASKS = "digits,synth-shapes,synth-count,synth-orientation,synth-colour"
PROXY = "--backbone vit_tiny_patch16_224 --weights runs/proxy/model.safetensors --model-kwargs img_size=32 " \
        "patch_size=8 depth=6"
RANDOM = "--backbone vit_tiny_patch16_224 --weights random --model-kwargs img_size=32 patch_size=8 depth=6"
SKIMAGE = "runs/skimage-crops"
CROPS = "tools/make_photo_task.py --source skimage"  # writes the independent task
SEEDS = (0, 1, 2)  # of the comparison on the independent data, for its spread
DTYPE_ARGS = {"demo": "--recipe recipes/demo.yaml",
              "proxy": "--recipe recipes/demo.yaml --weights runs/proxy/model.safetensors --model-kwargs img_size=32 "
                       "patch_size=8 depth=6"}
SEARCH_RUNS = {"demo": "bench-search-demo.json", "proxy": "bench-search-proxy.json"}  # tools/bench_search.py --json
BACKBONE_NAMES = {"demo": "The demo's backbone (random weights)", "proxy": "The proxy"}
COMMANDS = [
    "export OMP_NUM_THREADS=1  # one thread per process: faster on cores shared with other jobs",
    "python tools/pretrain_proxy.py --out runs/proxy{steps}",
    "inca-compare --recipe recipes/proxy-compare.yaml",
    "inca-compare --recipe recipes/proxy-compare.yaml --equal-budget --out runs/proxy-compare-equal",
    f"inca-probe {PROXY} --tasks {TASKS} --out runs/proxy-probe",
    f"inca-probe {RANDOM} --tasks {TASKS} --probes linear --out runs/random-probe",
    f"inca-probe {PROXY} --tasks {TASKS} --probes linear --layers -1 --final-norm --out runs/proxy-probe-norm",
    "pip install -e '.[results]'  # scikit-image, whose wheel holds the photographs",
    f"python {CROPS} --out {SKIMAGE}",
    f"inca-probe {PROXY} --tasks folder:{SKIMAGE} --probes linear --out runs/proxy-skimage-probe",
    f"inca-probe {RANDOM} --tasks folder:{SKIMAGE} --probes linear --out runs/random-skimage-probe",
    f"for s in {' '.join(map(str, SEEDS))}; do",
    "  inca-compare --recipe recipes/proxy-skimage.yaml --seed $s --out runs/proxy-skimage-compare-seed$s",
    "  inca-compare --recipe recipes/proxy-skimage.yaml --weights random --seed $s "
    "--out runs/random-skimage-compare-seed$s",
    "  inca-compare --recipe recipes/proxy-lora-same-trainer.yaml --seed $s --out runs/proxy-lora-same-trainer-seed$s",
    "done",
    *(f'python tools/bench_activations.py --only --accuracy "{a}" --json runs/bench-dtype-{b}.json'
      for b, a in DTYPE_ARGS.items()),
    *(f"python tools/bench_search.py --skip-{other} --repeats {{repeats}} --json runs/{SEARCH_RUNS[name]}"
      for name, other in (("demo", "proxy"), ("proxy", "demo"))),
    "python tools/proxy_results.py",
]
WINDOW = DEFAULT_WINDOW  # steps in the trailing mean of the training loss, inca.convergence's
ACCURACY_PNG, LOSS_PNG = "results_accuracy_vs_params.png", "results_loss.png"  # next to results.md
README_BEGIN = "<!-- results:begin (written by tools/proxy_results.py from docs/results.json; do not edit) -->"
README_END = "<!-- results:end -->"
METHOD_NAMES = {"inca": "InCA", "full": "full fine-tuning", "linear": "linear head on the last block"}
LAYER_PROBES = ("inca", "linear/cls", "linear/mean", "knn/cls", "knn/mean")
RECIPE_HISTORY = (
    "How the recipe was arrived at, on which images its candidates were compared, and why: "
    "[proxy-recipe.md](proxy-recipe.md). The recipe is frozen (the command below repeats it), and [the proxy on data "
    "it was not designed on](#the-proxy-on-data-it-was-not-designed-on) judges it on photographs that no candidate "
    "was compared on (an earlier recipe's loss there is why the recipe was revisited).")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="the folder the commands wrote into")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--readme", default="README.md", help="the README whose results block is rewritten")
    return parser.parse_args()


# ----------------------------------------------------------------------------------------------------
# Figures from the runs (written to docs/results.json)
# ----------------------------------------------------------------------------------------------------


def best_by_val(by_layer: dict[str, dict[str, float]]) -> tuple[int, dict[str, float]]:
    """The layer with the best val accuracy (ties: the shallower) and its scores."""
    layer = min(by_layer, key=lambda k: (-by_layer[k]["val"], int(k)))
    return int(layer), by_layer[layer]


def best_linear_cells(result: dict[str, Any]) -> list[tuple[str, str, dict[str, float]]]:
    """The (pool, layer, scores) of a task's linear probes with the best val accuracy: several where they tie."""
    cells = [(key.split("/", 1)[1], layer, s) for key, by_layer in result["results"].items()
             if key.startswith("linear/") for layer, s in by_layer.items()]
    best = max(s["val"] for _, _, s in cells)
    return [cell for cell in cells if cell[2]["val"] == best]


def best_linear_probe(result: dict[str, Any]) -> float:
    """Test accuracy of a task's best linear probe, pool and layer chosen on val; where several tie on val, the mean
    of their test accuracies (what breaking the tie at random gives on average), not the first one listed."""
    return float(np.mean([s["test"] for _, _, s in best_linear_cells(result)]))


def layer_verdict(by_layer: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Where one probe's best val accuracy lies against the last layer: ``below`` (every best layer is below the
    last), ``last`` (the last alone) or ``tie`` (the last ties with shallower layers)."""
    best = max(s["val"] for s in by_layer.values())
    layers = sorted(int(k) for k, s in by_layer.items() if s["val"] == best)
    last = max(int(k) for k in by_layer)
    verdict = "below" if last not in layers else "last" if layers == [last] else "tie"
    return {"best_layers": layers, "last": last, "last_val_gap": best - by_layer[str(last)]["val"],
            "verdict": verdict}


def by_task(summary: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """A comparison's records by task and method, tasks keyed by the names its reports show."""
    tasks: dict[str, dict[str, dict[str, Any]]] = {}
    for record in summary["results"]:
        tasks.setdefault(record["task"], {})[record["method"]] = record
    return by_task_name(tasks)


def read_run(path: Path) -> Any:
    """A run's output; a missing one stops the script naming it, never a figure made up in its place."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the command that writes it (the Commands list of docs/results.md, "
                         "COMMANDS in tools/proxy_results.py) first")
    return read_json(path)


def only_task(by_spec: dict[str, Any]) -> Any:
    """The entry of a report that holds one task (its spec may name the folder by an absolute path)."""
    if len(by_spec) != 1:
        raise SystemExit(f"expected one task, got {', '.join(by_spec)}")
    return next(iter(by_spec.values()))


def relative_spec(spec: str) -> str:
    """A ``folder:`` spec relative to the working directory, as the commands above give it."""
    kind, _, path = spec.partition(":")
    return f"{kind}:{os.path.relpath(path)}" if kind == "folder" and os.path.isabs(path) else spec


def independent_figures(probes: dict[str, dict[str, Any]], compares: dict[str, list[dict[str, Any]]]
                        ) -> dict[str, Any]:
    """The proxy against random weights on the independent task (each report's only one): the linear probe, and
    per compared method its test accuracy at each seed."""
    info = only_task(probes["proxy"]["tasks"])
    methods = [r["method"] for r in compares["proxy"][0]["results"]]
    rows = {"linear probe (inca-probe)": {w: [best_linear_probe(only_task(p["tasks"]))] for w, p in probes.items()}}
    for method in methods:
        rows[METHOD_NAMES.get(method, method)] = {
            w: [only_task(by_task(s))[method]["test_acc"] for s in summaries] for w, summaries in compares.items()}
    ties = {w: [{"pool": pool, "layer": int(layer), "test": s["test"]}
                for pool, layer, s in best_linear_cells(only_task(p["tasks"]))] for w, p in probes.items()}
    return {"task": relative_spec(info["task"]), "classes": len(info["classes"]), "sizes": info["sizes"],
            "seeds": [s["config"]["seed"] for s in compares["proxy"]],
            "epochs": compares["proxy"][0]["config"]["epochs"], "rows": rows,
            "linear_ties": {w: cells for w, cells in ties.items() if len(cells) > 1}}


def same_trainer_figures(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """LoRA and LoRA-GA through the same trainer settings (recipes/proxy-lora-same-trainer.yaml), one run per seed:
    each method's test accuracy per seed, and inca.convergence's table over the runs (LoRA the reference)."""
    accuracy: dict[str, dict[str, list[float]]] = {}
    for summary in summaries:
        for task, records in by_task(summary).items():
            for method, r in records.items():
                accuracy.setdefault(task, {}).setdefault(method, []).append(r["test_acc"])
    return {"seeds": [s["config"]["seed"] for s in summaries], "accuracy": accuracy,
            "convergence": convergence_table(summaries, WINDOW, reference="lora")}


def budget_figures(default: dict[str, Any], equal: dict[str, Any]) -> dict[str, Any]:
    """Per task and method, test accuracy and configurations trained at each method's own tuning budget and at the
    equal one (``inca-compare --equal-budget``), with InCA's layer."""
    if not equal["protocol"].get("equal_budget"):
        raise SystemExit("the equal-budget comparison was run without --equal-budget")
    tasks: dict[str, dict[str, dict[str, Any]]] = {}
    for budget, summary in (("own", default), ("equal", equal)):
        for task, records in by_task(summary).items():
            for method, r in records.items():
                tasks.setdefault(task, {}).setdefault(method, {})[budget] = {
                    "test_acc": r["test_acc"], "configurations": r["configurations"]["total"],
                    "layer": (r.get("tuned") or {}).get("layer")}
    return {"lr_grid": equal["protocol"]["lr_grid"], "tasks": tasks}


def search_figures(runs: Path) -> dict[str, Any]:
    """tools/bench_search.py's ``--json`` runs, one a backbone (the demo's needs no proxy, so it can run first),
    joined into one: they must share their settings and threads."""
    parts = {name: read_run(runs / file) for name, file in SEARCH_RUNS.items()}
    for name, part in parts.items():
        if name not in part["backbones"]:
            raise SystemExit(f"{runs / SEARCH_RUNS[name]} holds no run on the {name} backbone: rerun its command")
    demo, proxy = parts["demo"], parts["proxy"]
    if (demo["settings"], demo["threads"]) != (proxy["settings"], proxy["threads"]):
        raise SystemExit(f"{runs / SEARCH_RUNS['demo']} and {runs / SEARCH_RUNS['proxy']} were run with different "
                         "settings or threads: rerun both with the same")
    return {"settings": demo["settings"], "threads": demo["threads"],
            "backbones": {name: part["backbones"][name] for name, part in parts.items()}}


def collect(pretraining: dict[str, Any], compare: dict[str, Any], probe: dict[str, Any], random: dict[str, Any],
            independent: dict[str, Any], same_trainer: dict[str, Any]) -> dict[str, Any]:
    """The figures of the runs on the proxy that the claims, the summary and README quote."""
    kept = ("steps", "planned_steps", "seconds", "threads")
    figures: dict[str, Any] = {"pretraining": {k: pretraining[k] for k in kept}, "tasks": []}
    probed, random_probed = by_task_name(probe["tasks"]), by_task_name(random["tasks"])
    for task, records in by_task(compare).items():
        inca, full = records.get("inca", {}), records.get("full", {})
        result = probed[task]
        figures["tasks"].append({
            "task": task, "inca": inca.get("test_acc"), "inca_layer": (inca.get("tuned") or {}).get("layer"),
            "full": full.get("test_acc"),
            "layers": {k: layer_verdict(result["results"][k]) for k in LAYER_PROBES if k in result["results"]},
            "linear_probe": {"random": best_linear_probe(random_probed[task]),
                             "proxy": best_linear_probe(result)}})
    figures["convergence"] = convergence_table([compare], WINDOW, reference="lora")
    figures["independent"] = independent
    figures["same_trainer"] = same_trainer
    return figures


# ----------------------------------------------------------------------------------------------------
# Rendering from the figures (pure: tests/test_results_doc.py calls these on docs/results.json)
# ----------------------------------------------------------------------------------------------------


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _spread(values: list[float]) -> str:
    """Mean, and the range when there is more than one value."""
    mean = f"{np.mean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.3f}-{max(values):.3f})"


def _layer_cell(v: dict[str, Any]) -> str:
    best = ", ".join(map(str, v["best_layers"]))
    if v["verdict"] == "last":
        return f"{best} (the last)"
    if v["verdict"] == "tie":
        return f"{best} (tie incl. the last)"
    return f"{best} (last {v['last']}: {-v['last_val_gap']:+.3f} val)"


def _layer_counts(figures: dict[str, Any]) -> dict[str, int]:
    verdicts = [v["verdict"] for t in figures["tasks"] for v in t["layers"].values()]
    return {k: verdicts.count(k) for k in ("below", "tie", "last")} | {"total": len(verdicts)}


def _ratios(table: dict[str, Any], method: str) -> dict[str, list[float]]:
    """The reference's steps over ``method``'s, ``[min, max]`` over the runs, from an inca.convergence table, on
    each task where the measure separates the methods: none is at the target from its first step at any run
    (where the linear-probe head already fits a task, every method would tie at step 1)."""
    return {task: e["methods"][method]["ratio"] for task, e in table["tasks"].items()
            if method in e["methods"] and all(m["steps"][0] > 1 for m in e["methods"].values())}


def _ratio_values(ratios: dict[str, list[float]]) -> list[float]:
    return [r for pair in ratios.values() for r in pair]


def claims_lines(figures: dict[str, Any]) -> list[str]:
    """The three measured claims."""
    tasks = figures["tasks"]
    lines = ["## The claims, measured", ""]
    rows, gaps = [], []
    for t in tasks:
        if t["inca"] is None or t["full"] is None:
            continue
        gaps.append(t["inca"] - t["full"])
        rows.append([t["task"], f"{t['inca']:.3f} (layer {t['inca_layer']})", f"{t['full']:.3f}",
                     f"{t['inca'] - t['full']:+.3f}"])
    lines += ["**InCA on intermediate layers vs full fine-tuning** (the InCA paper: adapters on the frozen "
              "backbone's intermediate layers rival full fine-tuning). InCA's layer is chosen on val.", "",
              markdown_table(["task", "InCA (layer)", "full fine-tuning", "InCA - full"], rows).rstrip(), ""]
    if gaps:
        lines += [f"Mean gap: {np.mean(gaps):+.3f} over {len(gaps)} tasks.", ""]
    table = figures["convergence"]
    ratios = _ratios(table, "lora-ga")
    lines += ["**Convergence** (the LoRA-GA paper: 2-4x fewer steps than LoRA to the same loss), inca.convergence's "
              "measure, every method at its authors' defaults (learning rate, weight decay, warm-up and schedule "
              "differ between them).", "", *convergence_lines(table), ""]
    flat = [task for task in table["tasks"] if task not in ratios]
    if flat:
        lines += [f"On {', '.join(flat)} a method is at the target from its first step (the linear-probe head "
                  "already fits the task): the measure cannot tell them apart there, and the ratios leave it out.",
                  ""]
    if ratios:
        lines += [f"LoRA's steps over LoRA-GA's: {_ratio_range(ratios)} (median "
                  f"{np.median(_ratio_values(ratios)):.2f}x) over {len(ratios)} tasks.", ""]
    lines += same_trainer_lines(figures["same_trainer"])
    counts = _layer_counts(figures)
    keys = list(dict.fromkeys(k for t in tasks for k in t["layers"]))
    rows = [[t["task"], *(_layer_cell(t["layers"][k]) if k in t["layers"] else "-" for k in keys)] for t in tasks]
    lines += ["**Probing finds useful layers below the last** (the InCA paper's layer analysis). Every probe's "
              "best layer(s) on val accuracy, ties listed as ties; where the last layer is not among them, how far "
              "its val accuracy is below the best.", "",
              markdown_table(["task", *keys], rows).rstrip(), "",
              f"Over {counts['total']} task-probe pairs: the best layer is below the last on {counts['below']}, the "
              f"last ties for best on {counts['tie']}, the last alone is best on {counts['last']}.", ""]
    return lines


def same_trainer_lines(same: dict[str, Any]) -> list[str]:
    """LoRA against LoRA-GA as the LoRA-GA paper runs its baseline: both through the same trainer settings."""
    rows = [[task, *(_spread(by_method.get(m, [])) if m in by_method else "-" for m in ("lora", "lora-ga"))]
            for task, by_method in same["accuracy"].items()]
    ratios = _ratios(same["convergence"], "lora-ga")
    lines = ["**LoRA vs LoRA-GA through the same trainer**, as the LoRA-GA paper runs its LoRA baseline "
             "(`recipes/proxy-lora-same-trainer.yaml`: LoRA with LoRA-GA's learning rate, weight decay 0, warm-up "
             "0.03, cosine schedule and clipping at 1.0; both tune their learning rate over the same 3 values), seeds "
             f"{', '.join(map(str, same['seeds']))}. Test accuracy, mean and (range) over seeds:", "",
             markdown_table(["task", "LoRA", "LoRA-GA"], rows).rstrip(), "", *convergence_lines(same["convergence"]),
             ""]
    if ratios:
        lines += [f"Through the same trainer, LoRA's steps over LoRA-GA's: "
                  f"{_ratio_range(ratios)} over the seeds on the "
                  f"{len(ratios)} tasks where no method is at the target from its first step "
                  f"({', '.join(ratios)}).", ""]
    return lines


def independent_lines(figures: dict[str, Any]) -> list[str]:
    """The proxy against random weights on the independent data."""
    ind = figures["independent"]
    sizes = ", ".join(f"{k} {n}" for k, n in ind["sizes"].items())
    lines = ["## The proxy on data it was not designed on", "",
             "Crops of the real photographs and texture scans that scikit-image's wheel bundles (`skimage/data`: "
             "an astronaut portrait, a cameraman, a cat, coffee, coins, the Moon, a rocket launch, a retina, a "
             "stained tissue slide, cells, Hubble's deep field, a motorcycle, a clock, printed and handwritten "
             f"text, brick, grass, gravel), written by `{CROPS}`: the class is the source image, "
             f"{ind['classes']} classes ({sizes} crops), 32x32 crops of 24-64 pixels, and train, val and test "
             "crops come from disjoint tiles of each image, so no crop shares a pixel with another split's. The "
             "data is independent of the proxy: photographs, where the pretraining saw only formulas, installed "
             "offline by `pip install scikit-image`. An earlier recipe lost to random weights here, which is why "
             "the recipe was revisited; the candidates were compared on other images only (matplotlib's and "
             "scikit-learn's bundled ones, and the five tasks above: [proxy-recipe.md](proxy-recipe.md)), never on "
             "this data, and the frozen pick was run on it once, for the figures below.", "",
             f"Random weights (timm's init, seed 0) against the proxy, the same settings for both: the linear probe "
             f"(`inca-probe --probes linear`, layer and pool chosen on val) and `inca-compare` ({ind['epochs']} "
             f"epochs, each method at its defaults, InCA's layer chosen on val) at seeds "
             f"{', '.join(map(str, ind['seeds']))}: test accuracy, the mean and (range) over seeds.", ""]
    rows = []
    for name, by_weights in ind["rows"].items():
        random, proxy = by_weights["random"], by_weights["proxy"]
        rows.append([name, _spread(random), _spread(proxy), f"{np.mean(proxy) - np.mean(random):+.3f}",
                     f"{_wins(by_weights)} of {len(proxy)}"])
    lines += [markdown_table(["method", "random weights", "proxy", "proxy - random", "runs the proxy wins"],
                             rows).rstrip(), "", *tie_lines(ind.get("linear_ties", {})), independent_verdict(ind), ""]
    return lines


def tie_lines(ties: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Where the linear probe's best val accuracy is shared: which probes tie, and that the row is their mean."""
    lines = []
    for weights, cells in ties.items():
        tied = " and ".join(f"block {c['layer']} ({c['pool']} pool, test {c['test']:.3f})" for c in cells)
        lines.append(f"With {'random weights' if weights == 'random' else 'the proxy'}, the linear probe's best val "
                     f"accuracy is shared by {tied}: the row gives the mean of their test accuracies, what breaking "
                     "the tie at random gives on average.")
    return lines + ([""] if lines else [])


def _wins(by_weights: dict[str, list[float]]) -> int:
    return sum(p > r for p, r in zip(by_weights["proxy"], by_weights["random"]))


def independent_verdict(ind: dict[str, Any]) -> str:
    """Whether the proxy beats random weights on the independent data: with which methods at every run."""
    gains = {n: f"{n} {_points(float(np.mean(w['proxy']) - np.mean(w['random'])))}" for n, w in ind["rows"].items()}
    beats = [gains[n] for n, w in ind["rows"].items() if _wins(w) == len(w["proxy"])]
    not_beats = [gains[n] for n, w in ind["rows"].items() if _wins(w) < len(w["proxy"])]
    if not not_beats:
        return f"The proxy beats random weights here with every method at every run ({', '.join(beats)} points)."
    if not beats:
        return (f"The proxy does not beat random weights on this data ({', '.join(not_beats)} points): on these "
                "photographs its pretraining does not help.")
    return (f"The proxy beats random weights at every run only with {', '.join(beats)} points; it does not with "
            f"{', '.join(not_beats)} points.")


def readme_block(figures: dict[str, Any]) -> str:
    """README's results paragraph: every run figure it quotes, from docs/results.json."""
    tasks = figures["tasks"]
    run = figures["pretraining"]
    steps = "" if run["steps"] == run["planned_steps"] else \
        f" ({run['steps']} of its {run['planned_steps']} steps: the time budget ran out on shared cores)"
    sentences = [f"The proxy was pretrained in {run['seconds'] / 60:.0f} minutes on {run['threads']} CPU "
                 f"thread{'s' if run['threads'] > 1 else ''}{steps}."]
    gaps = {t["task"]: t["inca"] - t["full"] for t in tasks if t["inca"] is not None and t["full"] is not None}
    if gaps:
        worst, best = min(gaps, key=gaps.get), max(gaps, key=gaps.get)
        sentences.append(f"On it, InCA (its layer chosen on val) minus full fine-tuning is "
                         f"{_points(float(np.mean(list(gaps.values()))))} test points on average (from {worst} "
                         f"{_points(gaps[worst])} to {best} {_points(gaps[best])}).")
    ratios = {f: _ratios(figures["convergence"], f) for f in ("lora-ga", "full")}
    if all(ratios.values()):
        sentences.append("To a common training loss (each task's worst final loss of the end-to-end methods), LoRA "
                         f"takes {_ratio_range(ratios['lora-ga'])} LoRA-GA's steps and {_ratio_range(ratios['full'])} "
                         f"full fine-tuning's on the {len(ratios['lora-ga'])} tasks where the measure separates "
                         "them, each method at its authors' defaults.")
    same = _ratios(figures["same_trainer"]["convergence"], "lora-ga")
    if same:
        sentences.append(f"Through the same trainer settings, as the LoRA-GA paper runs its baseline, LoRA takes "
                         f"{_ratio_range(same)} LoRA-GA's steps on "
                         f"{len(same)} tasks over {len(figures['same_trainer']['seeds'])} seeds"
                         + "".join(f"; {task} left out, where both start at the target at some seed"
                                   for task in figures["same_trainer"]["accuracy"] if task not in same) + ".")
    counts = _layer_counts(figures)
    sentences.append("Counting every probe (InCA, linear and kNN on both pools), the best layer on val is below the "
                     f"last in {counts['below']} of {counts['total']} task-probe pairs, the last ties for best in "
                     f"{counts['tie']} and is best alone in {counts['last']}.")
    linear = {t["task"]: t["linear_probe"]["proxy"] - t["linear_probe"]["random"] for t in tasks}
    sentences.append(f"The proxy's best linear probe beats random weights' on {sum(g > 0 for g in linear.values())} "
                     f"of {len(linear)} demo tasks (" + ", ".join(f"{t} {_points(g)}" for t, g in linear.items())
                     + " points), tasks its recipe was checked on.")
    ind = figures["independent"]
    scores = "; ".join(f"{name} {np.mean(w['proxy']):.3f} vs {np.mean(w['random']):.3f}"
                       for name, w in ind["rows"].items())
    sentences.append(f"On crops of scikit-image's photographs, on which no candidate recipe was compared, test "
                     f"accuracy of the proxy vs random weights is {scores} (trained methods: mean of "
                     f"{len(ind['seeds'])} seeds). "
                     + independent_verdict(ind))
    return textwrap.fill(" ".join(sentences), width=110, break_long_words=False, break_on_hyphens=False)


def _ratio_range(ratios: dict[str, list[float]]) -> str:
    low, high = min(_ratio_values(ratios)), max(_ratio_values(ratios))
    return f"{low:.2f}x" if low == high else f"{low:.2f}-{high:.2f}x"


def readme_with_block(readme: str, block: str) -> str:
    """``readme`` with the text between its results markers replaced by ``block``."""
    pattern = re.compile(re.escape(README_BEGIN) + r"\n.*?" + re.escape(README_END), re.S)
    if len(pattern.findall(readme)) != 1:
        raise SystemExit(f"README must hold one results block: {README_BEGIN} ... {README_END}")
    return pattern.sub(lambda _: f"{README_BEGIN}\n{block}\n{README_END}", readme)


def readme_block_of(readme: str) -> str:
    """The text between README's results markers."""
    start, end = readme.index(README_BEGIN) + len(README_BEGIN) + 1, readme.index(README_END) - 1
    return readme[start:end]


# ----------------------------------------------------------------------------------------------------
# Tables straight from the run outputs
# ----------------------------------------------------------------------------------------------------


def linear_section(proxy: dict[str, Any], random: dict[str, Any]) -> list[str]:
    """Linear-probe test accuracy per layer, proxy vs random weights, each pool."""
    lines = ["## Learned vs random features: the linear probe, layer by layer", "",
             "Logistic regression on the pooled tokens of each block (C tuned on val), test accuracy; the same "
             "architecture with random weights (timm's init, seed 0) against the proxy. Bold: the best layer on val.",
             ""]
    summary = []
    for task, result in proxy["tasks"].items():
        base = random["tasks"][task]["results"]
        pools = [key for key in result["results"] if key.startswith("linear/")]
        rows = []
        for layer in result["layers"]:
            row: list[Any] = [layer]
            for key in pools:
                for scores in (base[key], result["results"][key]):
                    best = best_by_val(scores)[0] == layer
                    cell = f"{scores[str(layer)]['test']:.3f}"
                    row.append(f"**{cell}**" if best else cell)
                row.append(f"{result['results'][key][str(layer)]['test'] - base[key][str(layer)]['test']:+.3f}")
            rows.append(row)
        headers = ["layer"] + [f"{k.split('/')[1]} {name}" for k in pools for name in ("random", "proxy", "gain")]
        lines += [f"### {task}", "", markdown_table(headers, rows).rstrip(), ""]
        for key in pools:
            (rl, rs), (pl, ps) = best_by_val(base[key]), best_by_val(result["results"][key])
            summary.append([task, key.split("/")[1], f"{rs['test']:.3f} (layer {rl})", f"{ps['test']:.3f} (layer {pl})",
                            f"{ps['test'] - rs['test']:+.3f}"])
    table = markdown_table(["task", "pool", "random: best layer on val", "proxy: best layer on val", "gain"], summary)
    intro = lines.index(f"### {next(iter(proxy['tasks']))}")
    return lines[:intro] + [table.rstrip(), ""] + lines[intro:]


def compare_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    """One table per task: each method's accuracy, size, cost and steps to the common loss target."""
    config = summary["config"]
    reach = {task: entry["methods"] for task, entry in figures["convergence"]["tasks"].items()}
    lines = ["## Every method on the proxy", "",
             f"`inca-compare` with {config['epochs']} epochs, batch size {config['batch_size']}, seed "
             f"{config['seed']}, device {config['device']}; every method at its authors' defaults "
             "(`inca-compare --help` lists each with its source). Test accuracy at the best-validation epoch; "
             f"trainable parameters include the head, % of the backbone's {summary['backbone_params']:,}. "
             "Steps to the common loss: the first step whose training loss (trailing mean over "
             f"{WINDOW} steps) reaches the task's worst final one among the methods measured ([the convergence "
             "claim](#the-claims-measured) says which are not, and why). Peak memory: " + summary["memory"] + ".",
             ""]
    headers = ["method", "test acc", "trainable params", "% of backbone", "seconds", "peak memory (MB)", "steps",
               "steps to the common loss"]
    for task, records in by_task(summary).items():
        rows = [[m, r["test_acc"], f"{r['trainable_params']:,}", percent_text(r["trainable_pct"]), r["seconds"],
                 r["peak_memory_mb"], r["steps"], reach[task][m]["steps"][0] if m in reach[task] else "-"]
                for m, r in records.items()]
        lines += [f"### {task}", "", markdown_table(headers, rows).rstrip(), ""]
    if any(r.get("activations") == "cache" for r in summary["results"]):
        lines += ["InCA read activation stores: its seconds include building one only where no earlier run had "
                  "built it.", ""]
    lines += ["Protocol:", "", *protocol_lines(summary["protocol"]), "",
              f"![test accuracy vs trainable parameters]({ACCURACY_PNG})", "",
              f"![training loss, trailing mean over {WINDOW} steps]({LOSS_PNG})", ""]
    return lines


def budget_lines(figures: dict[str, Any]) -> list[str]:
    """Each method's test accuracy at its own tuning budget against an equal one, with the configurations trained."""
    budget = figures["equal_budget"]
    k = budget["lr_grid"]
    lines = ["## Equal tuning budgets", "",
             "The comparison above gives each method the tuning its authors give it, so the methods train different "
             f"numbers of configurations per task. `--equal-budget` reruns it with {_plural(k, 'configuration')} "
             f"for every method (`--lr-grid {k}`): a method's other tuned axes stay at their defaults, and InCA "
             "trains on the one layer that a linear probe, run inside the comparison on the train and val splits, "
             "ranks best on val (`best:1`). Test accuracy (configurations trained per task; InCA's layer, chosen on "
             "val):", ""]
    rows = []
    for task, methods in budget["tasks"].items():
        for method, runs in methods.items():
            own, equal = runs["own"], runs["equal"]
            rows.append([task, method, *map(_budget_cell, (own, equal)), f"{equal['test_acc'] - own['test_acc']:+.3f}"])
    return [*lines, markdown_table(["task", "method", "own budget", "equal budget", "equal - own"], rows).rstrip(), ""]


def _budget_cell(run: dict[str, Any]) -> str:
    layer = "" if run["layer"] is None else f"; layer {run['layer']}"
    return f"{run['test_acc']:.3f} ({run['configurations']}{layer})"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def dtype_lines(figures: dict[str, Any]) -> list[str]:
    """Test accuracy from stores of each element type, against float16, on the demo backbone and the proxy."""
    dtypes = figures["dtypes"]
    lines = ["## Store element types", "",
             "`inca-train` with an activation store of each element type (`--cache-dtype`), the same seeds: test "
             "accuracy, and in points against float16 (`tools/bench_activations.py --accuracy`). The demo is "
             "`recipes/demo.yaml` (a 4-block ViT-Ti with random weights); the proxy, the same recipe on the proxy "
             "backbone.", ""]
    for name, report in dtypes.items():
        acc = report["test_acc"]
        points = {d: {t: 100 * (a[d] - a["float16"]) for t, a in acc.items()} for d in ("bfloat16", "int8")}
        rows = [[task, f"{a['float16']:.3f}", *(f"{a[d]:.3f} ({points[d][task]:+.1f})" for d in points)]
                for task, a in acc.items()]
        rows.append(["**mean**", f"{np.mean([a['float16'] for a in acc.values()]):.3f}",
                     *(f"{np.mean([a[d] for a in acc.values()]):.3f} ({np.mean(list(points[d].values())):+.2f})"
                       for d in points)])
        widest = {d: max(abs(v) for v in points[d].values()) for d in points}
        lines += [f"### {BACKBONE_NAMES[name]}: `inca-train {report['arguments']}`", "",
                  markdown_table(["task", "float16", "bfloat16 (points)", "int8 (points)"], rows).rstrip(), "",
                  f"Per task, bfloat16 moves test accuracy by up to {widest['bfloat16']:.1f} points and int8 by up "
                  f"to {widest['int8']:.1f}, either way.", ""]
    return lines


def search_lines(figures: dict[str, Any]) -> list[str]:
    """Successive halving against the full grid (tools/bench_search.py), per backbone."""
    run = figures["search"]
    settings = run["settings"]
    lines = ["## Successive halving against the grid", "",
             "`inca-train --search halving` against `--search grid` (`tools/bench_search.py`): every layer x "
             f"learning rates {', '.join(f'{v:g}' for v in settings['lr'])} x queries "
             f"{', '.join(map(str, settings['queries']))} x weight decays "
             f"{', '.join(f'{v:g}' for v in settings['weight_decay'])}, {settings['epochs']} epochs, on each task "
             f"of `recipes/demo.yaml`, its two searches reading one activation store, interleaved, at "
             f"{_plural(run['threads'], 'thread')}. Wall time is the median over the runs; test accuracy is that "
             "of the adapter each search selects on val; selected: where the searches' choices differ, what became "
             "of the grid's choice in the halving run.", ""]
    for name, tasks in run["backbones"].items():
        rows = [[t["task"], t["adapters"], f"{t['grid']['wall']:.1f}", f"{t['halving']['wall']:.1f}",
                 f"{t['halving']['wall'] / t['grid']['wall']:.2f}x",
                 f"{t['halving']['adapter_epochs']} of {t['grid']['adapter_epochs']}",
                 f"{t['grid']['test_acc']:.3f}", f"{t['halving']['test_acc']:.3f}",
                 f"{100 * (t['halving']['test_acc'] - t['grid']['test_acc']):+.1f}", t["selected"]] for t in tasks]
        wall = {s: sum(t[s]["wall"] for t in tasks) for s in ("grid", "halving")}
        test = {s: float(np.mean([t[s]["test_acc"] for t in tasks])) for s in ("grid", "halving")}
        lines += [f"### {BACKBONE_NAMES[name]}, halving rate {settings['halving_rate']}, "
                  f"{_plural(settings['repeats'], 'run')} of each search", "",
                  markdown_table(["task", "adapters", "grid s", "halving s", "halving / grid",
                                  "halving's adapter-epochs", "grid test", "halving test", "points", "selected"],
                                 rows).rstrip(), "",
                  f"Over the tasks: halving took {wall['halving'] / wall['grid']:.2f}x the grid's wall time, and "
                  f"the mean test accuracy of the selected adapter is {test['halving']:.3f} against "
                  f"{test['grid']:.3f} ({_points(test['halving'] - test['grid'])} points).", ""]
    return lines


def norm_lines(probe: dict[str, Any], norm: dict[str, Any]) -> list[str]:
    """The last block through the final norm against the best layer's linear probe (CLS token)."""
    rows = []
    for task, result in probe["tasks"].items():
        normed = norm["tasks"].get(task, {}).get("results", {}).get("linear/cls", {}).get(str(result["layers"][-1]))
        best = best_by_val(result["results"]["linear/cls"])[1]
        rows.append([task, f"{normed['test']:.3f}" if normed else "-", f"{best['test']:.3f}"])
    return ["The last block through the backbone's final norm (as DINO evaluates) against the best layer on val, "
            "linear probe on the CLS token, test accuracy:", "",
            markdown_table(["task", "last layer + final norm", "best layer"], rows).rstrip(), ""]


def plot_losses(path: Path, summary: dict[str, Any]) -> None:
    """The end-to-end methods' training loss per step (trailing mean), one small panel per task."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    for record in summary["results"]:
        if record["method"] != "inca" and record.get("loss_curve"):
            tasks.setdefault(record["task"], []).append(record)
    fig = Figure(figsize=(8.5, 4.8))
    axes = fig.subplots(2, 3, squeeze=False).ravel()
    for ax, (task, records) in zip(axes, tasks.items()):
        for r in records:
            ax.plot(np.arange(1, r["steps"] + 1), smoothed_loss(r["loss_curve"], WINDOW), linewidth=1,
                    label=r["method"])
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("cross-entropy", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    save_figure(fig, path)


def objective(pretraining: dict[str, Any]) -> str:
    """The reconstruction term of the pretraining objective, where it had one."""
    if not pretraining.get("reconstruction"):
        return ""
    return (f"; plus the views' pixels reconstructed from the last block's patch tokens at weight "
            f"{pretraining['reconstruction']:g}, final error {pretraining['final_reconstruction_error']:.3f}")


def sizing(pretraining: dict[str, Any]) -> str:
    """How the proxy's number of steps came about, and how to repeat it."""
    planned = pretraining["planned_steps"]
    how = "sized by its time budget to" if pretraining["calibrated"] else "a fixed schedule of"
    if not pretraining["finished"]:
        return (f"The proxy run was {how} {planned} steps, and the budget ran out after {pretraining['steps']} of "
                f"them, near the end of the cosine decay; `--steps {planned}` with a larger `--minutes` reruns "
                "the planned schedule.")
    return f"The proxy run was {how} {planned} steps; `--steps {planned}` repeats it exactly."


def with_relative_weights(report: dict[str, Any]) -> dict[str, Any]:
    """The report with its weights file named relative to the working directory (the repository root in the
    commands above), not by this machine's absolute path."""
    weights = report["backbone"]["weights"]
    if weights in ("pretrained", "random"):
        return report
    return {**report, "backbone": {**report["backbone"], "weights": os.path.relpath(weights)}}


def main() -> None:
    args = parse_args()
    runs, out = Path(args.runs), Path(args.out)
    proxy = read_run(runs / "proxy" / "config.json")
    summary = read_run(runs / "proxy-compare" / COMPARE_JSON)
    probe, random, norm = (read_run(runs / name / PROBE_JSON)
                           for name in ("proxy-probe", "random-probe", "proxy-probe-norm"))
    weights = ("random", "proxy")
    independent = independent_figures(
        {w: read_run(runs / f"{w}-skimage-probe" / PROBE_JSON) for w in weights},
        {w: [read_run(runs / f"{w}-skimage-compare-seed{s}" / COMPARE_JSON) for s in SEEDS] for w in weights})
    same_trainer = same_trainer_figures(
        [read_run(runs / f"proxy-lora-same-trainer-seed{s}" / COMPARE_JSON) for s in SEEDS])
    pretraining = proxy["pretraining"]
    figures = collect(pretraining, summary, probe, random, independent, same_trainer)
    figures["equal_budget"] = budget_figures(summary, read_run(runs / "proxy-compare-equal" / COMPARE_JSON))
    figures["dtypes"] = {name: read_run(runs / f"bench-dtype-{name}.json") for name in DTYPE_ARGS}
    figures["search"] = search_figures(runs)
    kwargs = " ".join(f"{k}={v}" for k, v in proxy["model_kwargs"].items())
    lines = [
        "# Results on a pretrained proxy backbone",
        "",
        "Generated by `tools/proxy_results.py` from the runs below; rerun them to reproduce (the proxy's weights "
        "stay out of git, under `runs/`). Every figure that the claims and README quote is also in "
        "`docs/results.json`.",
        "",
        f"The backbone is `{proxy['backbone']}` with `{kwargs}`, pretrained offline by `tools/pretrain_proxy.py` on "
        f"formula-driven images ({', '.join(f'{n} {k}' for k, n in pretraining['classes'].items())} classes, "
        f"{pretraining['images_per_class']} images each; {pretraining['steps']} steps of batch "
        f"{pretraining['batch_size']} in {pretraining['seconds']} s, final classification loss "
        f"{pretraining['final_loss']:.3f}{objective(pretraining)}). No natural image and no download is involved.",
        "",
        RECIPE_HISTORY,
        "",
        "## Commands",
        "",
        "```",
        *(c.replace("{steps}", "" if pretraining["calibrated"] else
                    f" --steps {pretraining['planned_steps']} --minutes 40  # the frozen recipe (40: a cap only)")
          .replace("{repeats}", str(figures["search"]["settings"]["repeats"])) for c in COMMANDS),
        "```",
        "",
        sizing(pretraining) + f" Machine: {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}; the cores were shared with "
        "other jobs, so seconds are indicative.",
        "",
        *linear_section(probe, random),
        *independent_lines(figures),
        *compare_section(summary, figures),
        *budget_lines(figures),
        *claims_lines(figures),
        *norm_lines(probe, norm),
        *dtype_lines(figures),
        *search_lines(figures),
        "## What this does and does not show",
        "",
        "These are a 6-block ViT-Ti at 32 pixels, pretrained for minutes on synthetic formulas, on five small "
        "tasks of 1,000-1,300 training images and one small set of photographs, on CPU. They show that the "
        "methods run as their authors configure them under one protocol, how the three claims come out at this "
        "scale, and whether the proxy's features beat random ones on data its recipe was not chosen on. They do "
        "not reproduce the papers: the InCA paper's claims are about ViT-L/16 and larger, pretrained on "
        "ImageNet-21k or more, on its 11-dataset suite; LoRA-GA's are about T5 and Llama on GLUE and instruction "
        "data; one seed on small tasks leaves differences of a few points within noise.",
        "",
        "## The probe report on the proxy",
        "",
        render_probe_report(with_relative_weights(probe)).replace("# Layer probing", "### Layer probing")
        .replace("\n## ", "\n#### "),
    ]
    atomic_write_json(out.with_suffix(".json"), figures)
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    shutil.copyfile(runs / "proxy-compare" / COMPARE_ACCURACY_PNG, out.parent / ACCURACY_PNG)
    plot_losses(out.parent / LOSS_PNG, summary)
    readme = Path(args.readme)
    atomic_write_text(readme, readme_with_block(readme.read_text(), readme_block(figures)))
    print(f"wrote {out}, {out.with_suffix('.json')}, its two plots and {readme}'s results block")
    for t in figures["tasks"]:
        print({k: fmt(v) for k, v in t.items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
