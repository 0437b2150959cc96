"""Which probe's validation ranking of the layers to trust: the measurement behind ``--rank-by``'s default.

Per task of the demo (``recipes/demo.yaml``: its tiny ViT with random weights, digits and the four synth tasks),
the demo's InCA grid trains on every layer as ``inca-train`` trains it (:func:`inca.train.runner.train_inca_task`:
each adapter at its best val epoch). A layer's *trained accuracy* is the test accuracy of its adapter chosen on val
among the grid's learning rates: what training on that layer delivers. The registered probes then run on every
layer (:func:`inca.probes.run.run_probes`, ``inca-probe``'s defaults), and each probe's ranking
(:func:`inca.probes.ranking.rank_by_probe`: val accuracy only) is scored against the trained accuracies:

* top-1 hit: its first layer is one of the layers of best trained accuracy (ties count as hits);
* Spearman's rho between its val scores and the trained accuracies, across layers;
* best:K: the test accuracy ``inca-train --layers best:K`` delivers under that ranking (the adapter chosen on val
  among the K layers' adapters of the bank trained on every layer: each adapter of a bank trains on its own),
  beside ``--layers all``.

Every figure is per task and seed, then the mean over them. The trained banks, the probes' results and the
table go to ``--out`` (``layer_choice.json``, ``layer_choice.md``).

    OMP_NUM_THREADS=1 python tools/measure_layer_choice.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import spearmanr

from inca.backbone import create_backbone, resolve_layers
from inca.io import atomic_write_text
from inca.probes import PROBES, ProbeSuiteConfig
from inca.probes.ranking import rank_by_probe
from inca.probes.run import run_probes
from inca.report import markdown_table
from inca.tasks import load_task
from inca.train.config import InCATrainConfig
from inca.train.runner import train_inca_task

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
KS = (1, 2)


def trained_by_layer(adapters: list[dict]) -> dict[int, dict]:
    """Per layer, its adapter chosen on val (ties: the earlier one, as inca-train's selection)."""
    chosen: dict[int, dict] = {}
    for adapter in adapters:
        layer, val = adapter["layer"], _num(adapter["val_acc"])
        if layer not in chosen or val > _num(chosen[layer]["val_acc"]):
            chosen[layer] = adapter
    return chosen


def _num(value: float | None) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def delivered(adapters: list[dict], layers: list[int]) -> float:
    """Test accuracy of the adapter inca-train selects on val among ``layers``' adapters."""
    pool = [a for a in adapters if a["layer"] in layers]
    best = max(range(len(pool)), key=lambda i: (_num(pool[i]["val_acc"]), -i))
    return pool[best]["test_acc"]


def measure_task(backbone, spec: str, config: InCATrainConfig, seed: int, out: Path) -> dict:
    """One task and seed: the trained accuracies, every probe's results and how each ranking scores."""
    task = load_task(spec)
    layers = resolve_layers("all", backbone.num_blocks)
    result = train_inca_task(backbone, task, layers, config, out / f"{task.slug}-{seed}")
    adapters = result["adapters"]
    truth = {layer: adapter["test_acc"] for layer, adapter in trained_by_layer(adapters).items()}
    top = max(truth.values())
    probed = run_probes(backbone, task, layers, ProbeSuiteConfig(seed=seed, cache_dir=config.cache_dir)).results
    scores = {"all": delivered(adapters, layers)}
    per_probe = {}
    for probe in PROBES:
        ranking = rank_by_probe(probed, probe)
        rho = spearmanr([ranking.scores[layer][0] for layer in layers], [truth[layer] for layer in layers])[0]
        per_probe[probe] = {
            "ranked": ranking.text, "hit": truth[ranking.ranking[0]] == top,
            "rho": None if math.isnan(rho) else float(rho),
            **{f"best:{k}": delivered(adapters, ranking.best(k)) for k in KS},
        }
    return {"task": spec, "seed": seed, "trained": {str(k): v for k, v in truth.items()}, "all": scores["all"],
            "probes": per_probe, "probe_results": {key: {str(k): v for k, v in by_layer.items()}
                                                   for key, by_layer in probed.items()}}


def seed_means(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per task, each layer's trained accuracy averaged over the seeds: a steadier truth than one seed's."""
    by_task: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for layer, accuracy in run["trained"].items():
            by_task.setdefault(run["task"], {}).setdefault(layer, []).append(accuracy)
    return {task: {layer: statistics.mean(values) for layer, values in layers.items()}
            for task, layers in by_task.items()}


def render(runs: list[dict], command: str) -> str:
    """The summary table (mean over tasks and seeds) and the per-task rankings."""
    means = seed_means(runs)
    headers = ["rank by", "top-1 hits", "mean Spearman rho", *[f"best:{k} test" for k in KS],
               *[f"best:{k}, seed-mean trained acc" for k in KS]]
    rows = []
    for probe in PROBES:
        values = [run["probes"][probe] for run in runs]
        rhos = [v["rho"] for v in values if v["rho"] is not None]
        steady = [[max(means[run["task"]][str(layer)] for layer in rank_by_probe(run["probe_results"], probe).best(k))
                   for run in runs] for k in KS]
        rows.append([probe, f"{sum(v['hit'] for v in values)} of {len(values)}",
                     f"{statistics.mean(rhos):.2f} ({len(rhos)} defined)" if rhos else "n/a",
                     *[f"{statistics.mean(v[f'best:{k}'] for v in values):.3f}" for k in KS],
                     *[f"{statistics.mean(column):.3f}" for column in steady]])
    oracle = statistics.mean(max(means[run["task"]].values()) for run in runs)
    rows.append(["(all layers / the best layer)", "", "", f"{statistics.mean(run['all'] for run in runs):.3f}", "",
                 f"{oracle:.3f}", ""])
    lines = ["# Which probe ranks the layers best", "", f"`{command}`", "", markdown_table(headers, rows), ""]
    detail = [[run["task"], run["seed"], " ".join(f"{k}:{v:.3f}" for k, v in run["trained"].items()),
               *[f"{run['probes'][p]['ranked']} (rho {_rho(run['probes'][p]['rho'])})" for p in PROBES]]
              for run in runs]
    lines += [markdown_table(["task", "seed", "trained test acc by layer", *PROBES], detail)]
    return "\n".join(lines) + "\n"


def _rho(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> None:
    demo = yaml.safe_load(DEMO.read_text())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(demo["tasks"]), help="default: recipes/demo.yaml's five")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the adapters, batches and probes")
    parser.add_argument("--depth", type=int, default=None, help="blocks of the demo ViT (default: the recipe's)")
    parser.add_argument("--weights", default=None,
                        help="backbone weights (default: the recipe's random ones; docs/results.md's proxy: "
                             "runs/proxy/model.safetensors with --depth 6)")
    parser.add_argument("--out", default="runs/layer-choice")
    parser.add_argument("--render", action="store_true", help="only redraw the table from --out's layer_choice.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    command = "OMP_NUM_THREADS=1 python tools/measure_layer_choice.py " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", *([f"--depth {args.depth}"] if args.depth else []),
         *([f"--weights {args.weights}"] if args.weights else [])])
    if args.render:
        print(render(json.loads((out / "layer_choice.json").read_text()), command))
        return
    kwargs = dict(item.split("=") for item in demo["model_kwargs"])
    kwargs = {k: int(v) for k, v in kwargs.items()}
    if args.depth:
        kwargs["depth"] = args.depth
    backbone = create_backbone(demo["backbone"], args.weights or demo["weights"], kwargs)
    runs = []
    for seed in args.seeds:
        config = InCATrainConfig(lr=demo["lr"], epochs=demo["epochs"], batch_size=demo["batch_size"], seed=seed,
                                 adapter_seeds=[seed], cache_dir=str(out / "stores"))
        for spec in args.tasks.split(","):
            runs.append(measure_task(backbone, spec, config, seed, out / "banks"))
            print(f"{spec} seed {seed}: " + ", ".join(f"{p} {runs[-1]['probes'][p]['ranked']}" for p in PROBES),
                  flush=True)
    text = render(runs, command)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "layer_choice.json", json.dumps(runs, indent=1))
    atomic_write_text(out / "layer_choice.md", text)
    print(text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
