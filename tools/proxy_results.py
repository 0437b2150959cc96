"""Turn the proxy-backbone runs into ``docs/results.md`` (tables) and its two PNGs.

Reads what the commands in :data:`COMMANDS` wrote (run them first, from the repository root): the proxy's
``config.json`` (tools/pretrain_proxy.py), the ``inca-compare`` output of recipes/proxy-compare.yaml, and three
``inca-probe`` reports (the proxy, the same architecture with random weights, and the proxy's last block
through its final norm). Writes the tables, the figures' sources and the three measured claims: InCA (best
layer) against full fine-tuning, LoRA-GA's steps to LoRA's final training loss, and whether the best probing
layer is the last.

    python tools/proxy_results.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from curves import smoothed_loss, steps_to_reach
from matplotlib.figure import Figure

from inca.compare import ACCURACY_PNG as COMPARE_ACCURACY_PNG
from inca.compare import REPORT_JSON as COMPARE_JSON
from inca.compare import protocol_lines
from inca.io import atomic_write_text, read_json
from inca.probe import REPORT_JSON as PROBE_JSON
from inca.probe import render_probe_report
from inca.report import fmt, markdown_table, save_figure

TASKS = "digits,synth-shapes,synth-count,synth-orientation,synth-colour"
PROXY = "--backbone vit_tiny_patch16_224 --weights runs/proxy/model.safetensors --model-kwargs img_size=32 " \
        "patch_size=8 depth=6"
RANDOM = "--backbone vit_tiny_patch16_224 --weights random --model-kwargs img_size=32 patch_size=8 depth=6"
COMMANDS = [
    "export OMP_NUM_THREADS=1  # one thread per process: faster on cores shared with other jobs",
    "python tools/pretrain_proxy.py --out runs/proxy{steps}",
    "inca-compare --recipe recipes/proxy-compare.yaml",
    f"inca-probe {PROXY} --tasks {TASKS} --out runs/proxy-probe",
    f"inca-probe {RANDOM} --tasks {TASKS} --probes linear --out runs/random-probe",
    f"inca-probe {PROXY} --tasks {TASKS} --probes linear --layers -1 --final-norm --out runs/proxy-probe-norm",
    "python tools/proxy_results.py",
]
WINDOW = 10  # steps in the trailing mean of the training loss (as tools/bench_lora_ga.py)
ACCURACY_PNG, LOSS_PNG = "results_accuracy_vs_params.png", "results_loss.png"  # next to results.md


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", default="runs/proxy", help="tools/pretrain_proxy.py's --out")
    parser.add_argument("--compare", default="runs/proxy-compare", help="inca-compare's --out")
    parser.add_argument("--probe", default="runs/proxy-probe", help="inca-probe --out on the proxy")
    parser.add_argument("--random-probe", default="runs/random-probe", help="inca-probe --out on random weights")
    parser.add_argument("--norm-probe", default="runs/proxy-probe-norm", help="inca-probe --final-norm --out")
    parser.add_argument("--out", default="docs/results.md")
    return parser.parse_args()


def best_by_val(by_layer: dict[str, dict[str, float]]) -> tuple[int, dict[str, float]]:
    """The layer with the best val accuracy (ties: the shallower) and its scores."""
    layer = min(by_layer, key=lambda k: (-by_layer[k]["val"], int(k)))
    return int(layer), by_layer[layer]


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


def steps_column(records: dict[str, dict[str, Any]]) -> dict[str, int | None]:
    """Per method, the steps its smoothed training loss takes to reach LoRA's final one."""
    if "lora" not in records or not records["lora"].get("loss_curve"):
        return {}
    target = float(smoothed_loss(records["lora"]["loss_curve"], WINDOW)[-1])
    return {m: steps_to_reach(r["loss_curve"], target, WINDOW) for m, r in records.items()
            if m != "inca" and r.get("loss_curve")}


def compare_section(summary: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """One table per task, and per task the figures the claims need."""
    by_task: dict[str, dict[str, dict[str, Any]]] = {}
    for record in summary["results"]:
        by_task.setdefault(record["task"], {})[record["method"]] = record
    config = summary["config"]
    lines = ["## Every method on the proxy", "",
             f"`inca-compare` with {config['epochs']} epochs, batch size {config['batch_size']}, seed "
             f"{config['seed']}, device {config['device']}; every method at its authors' defaults "
             "(`inca-compare --help` lists each with its source). Test accuracy at the best-validation epoch; "
             f"trainable parameters include the head, % of the backbone's {summary['backbone_params']:,}. "
             f"Steps to LoRA's loss: the first step whose training loss (trailing mean over {WINDOW} steps) is at "
             "or below LoRA's final one. Peak memory: " + summary["memory"] + ".", ""]
    headers = ["method", "test acc", "trainable params", "% of backbone", "seconds", "peak memory (MB)", "steps",
               "steps to LoRA's final loss"]
    figures = []
    for task, records in by_task.items():
        reach = steps_column(records)
        rows = [[m, r["test_acc"], f"{r['trainable_params']:,}", r["trainable_pct"], r["seconds"],
                 r["peak_memory_mb"], r["steps"], reach.get(m, "")] for m, r in records.items()]
        lines += [f"### {task}", "", markdown_table(headers, rows).rstrip(), ""]
        inca, full, lora = (records.get(m, {}) for m in ("inca", "full", "lora"))
        figures.append({"task": task, "inca": inca.get("test_acc"),
                        "inca_layer": (inca.get("tuned") or {}).get("layer"),
                        "full": full.get("test_acc"), "lora_steps": lora.get("steps"),
                        "lora_ga_reach": reach.get("lora-ga"), "full_reach": reach.get("full")})
    if any(r.get("activations") == "cache" for r in summary["results"]):
        lines += ["InCA read activation stores: its seconds include building one only where no earlier run had "
                  "built it.", ""]
    lines += ["Protocol:", "", *protocol_lines(summary["protocol"]), "",
              f"![test accuracy vs trainable parameters]({ACCURACY_PNG})", "",
              f"![training loss, trailing mean over {WINDOW} steps]({LOSS_PNG})", ""]
    return lines, figures


def plot_losses(path: Path, summary: dict[str, Any]) -> None:
    """The end-to-end methods' training loss per step (trailing mean), one small panel per task."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for record in summary["results"]:
        if record["method"] != "inca" and record.get("loss_curve"):
            by_task.setdefault(record["task"], []).append(record)
    fig = Figure(figsize=(8.5, 4.8))
    axes = fig.subplots(2, 3, squeeze=False).ravel()
    for ax, (task, records) in zip(axes, by_task.items()):
        for r in records:
            ax.plot(np.arange(1, r["steps"] + 1), smoothed_loss(r["loss_curve"], WINDOW), linewidth=1,
                    label=r["method"])
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("cross-entropy", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for ax in axes[len(by_task):]:
        ax.set_visible(False)
    save_figure(fig, path)


def speed_up(steps: int | None, reach: int | None) -> str:
    return f"{steps / reach:.2f}x" if steps and reach else "-"


def claims_section(figures: list[dict[str, Any]], probe: dict[str, Any], norm: dict[str, Any]) -> list[str]:
    lines = ["## The claims, measured", ""]
    rows, gaps = [], []
    for f in figures:
        if f["inca"] is None or f["full"] is None:
            continue
        gap = f["inca"] - f["full"]
        gaps.append(gap)
        rows.append([f["task"], f"{f['inca']:.3f} (layer {f['inca_layer']})", f"{f['full']:.3f}", f"{gap:+.3f}"])
    lines += ["**InCA on intermediate layers vs full fine-tuning** (the InCA paper: adapters on the frozen "
              "backbone's intermediate layers rival full fine-tuning). InCA's layer is chosen on val.", "",
              markdown_table(["task", "InCA (layer)", "full fine-tuning", "InCA - full"], rows).rstrip(), "",
              f"Mean gap: {np.mean(gaps):+.3f} over {len(gaps)} tasks." if gaps else "", ""]
    rows = []
    for f in figures:
        lora = f["lora_steps"]
        rows.append([f["task"], lora, f["lora_ga_reach"] or "never", speed_up(lora, f["lora_ga_reach"]),
                     f["full_reach"] or "never", speed_up(lora, f["full_reach"])])
    lines += ["**LoRA-GA's convergence** (the LoRA-GA paper: 2-4x fewer steps than LoRA to the same loss). "
              "Steps to reach LoRA's final training loss; speed-up = LoRA's steps / theirs.", "",
              markdown_table(["task", "LoRA steps", "LoRA-GA steps", "LoRA-GA speed-up", "full FT steps",
                              "full FT speed-up"], rows).rstrip(), ""]
    rows = []
    for task, result in probe["tasks"].items():
        last = result["layers"][-1]
        cells = [task]
        for key in ("inca", "linear/cls", "linear/mean"):
            if key in result["best_layers"]:
                best = result["best_layers"][key][0]
                cells.append(f"{best}" + ("" if best == last else f" (last: {last})"))
        normed = norm["tasks"].get(task, {}).get("results", {}).get("linear/cls", {}).get(str(last))
        best_cls = result["results"]["linear/cls"][str(result["best_layers"]["linear/cls"][0])]
        cells.append(f"{normed['test']:.3f} vs {best_cls['test']:.3f}" if normed else "-")
        rows.append(cells)
    lines += ["**Probing finds useful layers below the last** (the InCA paper's layer analysis). Best layer on "
              "val per probe; the last column sets the last block through the backbone's final norm (as DINO "
              "evaluates) against the best layer's linear probe, CLS token, test accuracy.", "",
              markdown_table(["task", "InCA probe", "linear (cls)", "linear (mean)",
                              "last layer + final norm vs best (linear, cls)"], rows).rstrip(), ""]
    return lines


def wins(proxy: dict[str, Any], random: dict[str, Any]) -> str:
    """The tasks where the proxy's best linear probe (pool and layer chosen on val) beats random weights'."""
    def best(result: dict[str, Any]) -> float:
        scores = [best_by_val(v)[1] for k, v in result["results"].items() if k.startswith("linear/")]
        return max(scores, key=lambda s: s["val"])["test"]

    won = [t for t in proxy["tasks"] if best(proxy["tasks"][t]) > best(random["tasks"][t])]
    return f"{len(won)} of {len(proxy['tasks'])} tasks ({', '.join(won) or 'none'})"


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
    out = Path(args.out)
    proxy = read_json(Path(args.proxy) / "config.json")
    summary = read_json(Path(args.compare) / COMPARE_JSON)
    probe = read_json(Path(args.probe) / PROBE_JSON)
    random = read_json(Path(args.random_probe) / PROBE_JSON)
    norm = read_json(Path(args.norm_probe) / PROBE_JSON)
    compare_lines, figures = compare_section(summary)
    pretraining = proxy["pretraining"]
    kwargs = " ".join(f"{k}={v}" for k, v in proxy["model_kwargs"].items())
    lines = [
        "# Results on a pretrained proxy backbone",
        "",
        "Generated by `tools/proxy_results.py` from the runs below; rerun them to reproduce (the proxy's weights "
        "stay out of git, under `runs/`).",
        "",
        f"The backbone is `{proxy['backbone']}` with `{kwargs}`, pretrained offline by `tools/pretrain_proxy.py` on "
        f"formula-driven images ({', '.join(f'{n} {k}' for k, n in pretraining['classes'].items())} classes, "
        f"{pretraining['images_per_class']} images each; {pretraining['steps']} steps of batch "
        f"{pretraining['batch_size']} in {pretraining['seconds']} s, final classification loss "
        f"{pretraining['final_loss']:.3f}{objective(pretraining)}). No natural image and no download is involved.",
        "",
        "## Commands",
        "",
        "```",
        *(c.replace("{steps}", "" if pretraining["calibrated"] else
                    f" --steps {pretraining['planned_steps']} --minutes 20  # a budget the fixed schedule fits")
          for c in COMMANDS),
        "```",
        "",
        sizing(pretraining) + f" Machine: {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}; the cores were shared with "
        "other jobs, so seconds are indicative.",
        "",
        *linear_section(probe, random),
        *compare_lines,
        *claims_section(figures, probe, norm),
        "## What this does and does not show",
        "",
        "These are a 6-block ViT-Ti at 32 pixels, pretrained for minutes on synthetic formulas, on five small "
        "tasks of 1,000-1,300 training images, one seed, on CPU. They show that the methods run as their authors "
        "configure them under one protocol, that the proxy's features are learned (its best linear probe beats "
        f"random weights' on {wins(probe, random)}), and how the three claims come out at this scale. They do "
        "not reproduce the papers: the InCA "
        "paper's claims are about ViT-L/16 and larger, pretrained on ImageNet-21k or more, on its 11-dataset "
        "suite; LoRA-GA's are about T5 and Llama on GLUE and instruction data; one seed on small tasks leaves "
        "differences of a few points within noise.",
        "",
        "## The probe report on the proxy",
        "",
        render_probe_report(with_relative_weights(probe)).replace("# Layer probing", "### Layer probing")
        .replace("\n## ", "\n#### "),
    ]
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    shutil.copyfile(Path(args.compare) / COMPARE_ACCURACY_PNG, out.parent / ACCURACY_PNG)
    plot_losses(out.parent / LOSS_PNG, summary)
    print(f"wrote {out} and its two plots")
    for f in figures:
        print({k: fmt(v) for k, v in f.items()})


if __name__ == "__main__":
    main()
