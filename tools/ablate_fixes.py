"""Each fix that made the methods faithful to their authors and the comparison one protocol, measured alone:
the ``inca-compare`` table on the demo tasks with that one fix reverted (before) against every fix in (after),
plus a run with every revertible fix reverted at once, and the ``inca-probe`` table for the kNN fix.

A fix is reverted the way a user could have run the code before it: through ``--method-args`` and protocol
flags where the old behaviour is a setting (weight decay 0.01 and warm-up 0.1 for every end-to-end method, no
gradient clipping, LoRA's alpha 8, a random new head), and by reinstating the old code for the length of the
run where it was not (LoRA-GA's gradient estimate in eval mode, Compacter's plain Xavier factors and exact
GELU, Compacter's bottleneck check, InCA's last-epoch weights, kNN normalising the cached features in place).
Every run shares the demo recipe's backbone, tasks, epochs, batches and seed, so a difference is the fix's.

    python tools/ablate_fixes.py --out runs/fixes          (about 15 minutes on 2 CPU cores)

writes one ``inca-compare``/``inca-probe`` output directory per run under ``--out`` (a rerun resumes them) and
``docs/fixes.md``. The demo's backbone has random weights: the tables say what each fix changes in the
numbers a user reads, not which method is better.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
import yaml
from torch import nn

import inca.adapters.compacter as compacter
import inca.adapters.lora_ga as lora_ga
import inca.probes.knn as probe
import inca.train.bank as bank
from inca.cli import compare_main, probe_main
from inca.errors import InCAError
from inca.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "compare-demo.yaml"
END_TO_END = ["lora", "lora-ga", "compacter", "compacter++", "full"]
OLD_WEIGHT_DECAY, OLD_WARMUP = 0.01, 0.1  # the one setting every end-to-end method had before


# ----------------------------------------------------------------------------------------------------
# The old code, reinstated for one run each
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def lora_ga_gradient_in_eval_mode() -> contextlib.AbstractContextManager:
    """Before: the gradient estimate ran in the caller's mode, eval for the frozen backbone's copy."""
    estimate = lora_ga.estimate_gradients

    def in_eval_mode(model: nn.Module, *args, **kwargs):
        model.eval()
        model.train = lambda mode=True: model  # the estimate's model.train() becomes a no-op
        try:
            return estimate(model, *args, **kwargs)
        finally:
            del model.train

    return patched(lora_ga, "estimate_gradients", in_eval_mode)


@contextlib.contextmanager
def compacter_plain_xavier_exact_gelu() -> Iterator[None]:
    """Before: factors Xavier-uniform with gain 1, the adapters' GELU exact (erf)."""
    init = compacter.CompacterAdapter.__init__

    def exact_gelu(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.act = nn.GELU()

    with patched(compacter, "FACTOR_INIT_GAIN", 1.0), patched(compacter.CompacterAdapter, "__init__", exact_gelu):
        yield


def compacter_strict_bottleneck() -> contextlib.AbstractContextManager:
    """Before: a bottleneck ``width // reduction`` that is not a multiple of ``phm_dim`` was an error."""

    def strict(dim: int, reduction: int, phm_dim: int) -> int:
        if dim // reduction == 0 or dim // reduction % phm_dim:
            raise InCAError(f"Compacter: bottleneck {dim // reduction} (= width {dim} // reduction {reduction}) is "
                            f"not a positive multiple of phm_dim {phm_dim}")
        return dim // reduction

    return patched(compacter, "bottleneck_width", strict)


class LastEpochs(bank.BestEpochs):
    """Every epoch counts as each adapter's best, so each ends with its last epoch's weights."""

    def improved(self, accuracy, epoch: int) -> list[int]:
        for i, value in enumerate(accuracy):
            self.accuracy[i], self.epoch[i] = value, epoch
        return list(range(len(accuracy)))


def inca_last_epoch() -> contextlib.AbstractContextManager:
    """Before: each InCA adapter ended with its last epoch's weights (every epoch counted as its best)."""
    return patched(bank, "BestEpochs", LastEpochs)


def knn_in_place() -> contextlib.AbstractContextManager:
    """Before: kNN L2-normalised its inputs in place, and float32 contiguous inputs are the recorded features."""
    knn = probe.knn_predict

    def normalising_in_place(train: np.ndarray, y_train: np.ndarray, queries: np.ndarray, *args, **kwargs):
        for features in (train, queries):  # what np.ascontiguousarray handed faiss.normalize_L2 as is
            if features.dtype == np.float32 and features.flags.c_contiguous:
                faiss.normalize_L2(features)
        return knn(train, y_train, queries, *args, **kwargs)

    return patched(probe, "knn_predict", normalising_in_place)


# ----------------------------------------------------------------------------------------------------
# The fixes
# ----------------------------------------------------------------------------------------------------


def _each(methods: list[str], **values: object) -> list[str]:
    return [f"{method}.{key}={value}" for method in methods for key, value in values.items()]


@dataclass
class Fix:
    """One fix: what it changed, the methods it touches, and how its run reverts it."""

    name: str
    what: str
    visible: bool  # whether the demo setting can show the fix's effect at all
    why: str  # what decides it
    methods: list[str]
    method_args: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    code: list[Callable[[], contextlib.AbstractContextManager]] = field(default_factory=list)


CHANGES_TRAINING = "the fix changes the training, and the final losses show it"
FIXES = [
    Fix("lora-ga-trainer", "LoRA-GA trained with its authors' trainer settings (weight decay 0, warm-up 0.03 "
        "before the cosine decay; before: 0.01 and 0.1)", True, CHANGES_TRAINING, ["lora-ga"],
        _each(["lora-ga"], weight_decay=OLD_WEIGHT_DECAY, warmup_ratio=OLD_WARMUP)),
    Fix("lora-ga-train-mode", "LoRA-GA's gradient estimate in train mode (before: the frozen copy's eval mode). "
        "timm's ViTs default to no dropout and no drop-path, so the two modes compute the same function unless "
        "`drop_rate` or `drop_path_rate` is set in `--model-kwargs`", False, "the demo backbone sets neither, so "
        "before and after compute the same numbers", ["lora-ga"], code=[lora_ga_gradient_in_eval_mode]),
    Fix("compacter-init", "Compacter as the reference initialises and trains it: Glorot factors with gain "
        "sqrt(2), tanh GELU, weight decay 0 (before: gain 1, exact GELU, 0.01)", False, "the final training losses "
        "move in the fourth decimal and the test accuracies not at all. Every adapter starts near zero output (the "
        "shared rule is drawn at std 1e-4, as the reference draws it), and over 3 epochs the three changes stay too "
        "small to move an accuracy", ["compacter", "compacter++"],
        _each(["compacter", "compacter++"], weight_decay=OLD_WEIGHT_DECAY), code=[compacter_plain_xavier_exact_gelu]),
    Fix("compacter-bottleneck", "Compacter's bottleneck rounded up to a multiple of phm_dim (before: an error "
        "on ViT-Ti's width 192 at the default reduction 32)", True, "before, Compacter does not run",
        ["compacter", "compacter++"], code=[compacter_strict_bottleneck]),
    Fix("lora-settings", "LoRA at its authors' GLUE script's alpha 16 and weight decay 0.1 (before: alpha 8 from "
        "the paper's table, weight decay 0.01)", True, CHANGES_TRAINING, ["lora"],
        ["lora.alpha=8", f"lora.weight_decay={OLD_WEIGHT_DECAY}"]),
    Fix("full-trainer", "Full fine-tuning with LoRA-GA's baseline trainer (weight decay 0, warm-up 0.03; before: "
        "0.01 and 0.1)", True, CHANGES_TRAINING, ["full"],
        _each(["full"], weight_decay=OLD_WEIGHT_DECAY, warmup_ratio=OLD_WARMUP)),
    Fix("clipping", "Gradient-norm clipping at 1.0 for every end-to-end method (before: none)", True,
        CHANGES_TRAINING, END_TO_END, _each(END_TO_END, max_grad_norm=0)),
    Fix("inca-best-epoch", "InCA reports its best-validation epoch, as the end-to-end methods (before: its last "
        "epoch). The two coincide whenever the chosen adapter's best epoch is its last", False, "on both tasks the "
        "chosen adapter's best epoch is its last", ["inca"], code=[inca_last_epoch]),
    Fix("head-init", "The end-to-end methods' new head starts from a linear probe (before: timm's random draw)",
        True, CHANGES_TRAINING, END_TO_END, flags=["--head-init", "random"]),
]
EVERY_FIX = Fix(  # the bottleneck check stays fixed: reverted, Compacter cannot run on the demo's width
    "every-fix", "Every fix above reverted at once, except the bottleneck rounding (reverted, Compacter does not "
    "run)", True, "only through the fixes above that it can show", ["inca", *END_TO_END],
    [arg for fix in FIXES for arg in fix.method_args], [flag for fix in FIXES for flag in fix.flags],
    [code for fix in FIXES if fix.name != "compacter-bottleneck" for code in fix.code],
)


# ----------------------------------------------------------------------------------------------------
# Runs and the report
# ----------------------------------------------------------------------------------------------------


def run_compare(out: Path, methods: list[str], fix: Fix | None) -> dict:
    """``inca-compare`` on the demo recipe into ``out`` (resuming), under ``fix``'s revert; its compare.json,
    or ``{"error": line}`` when the command refused."""
    argv = ["--recipe", str(RECIPE), "--methods", ",".join(methods), "--out", str(out), "--quiet"]
    if fix is not None:
        argv += [*fix.flags, "--method-args", *fix.method_args] if fix.method_args else fix.flags
    stderr = io.StringIO()
    with contextlib.ExitStack() as stack:
        for code in fix.code if fix is not None else []:
            stack.enter_context(code())
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # its tables: read from compare.json
        stack.enter_context(contextlib.redirect_stderr(stderr))
        status = compare_main(argv)
    if status:
        return {"error": stderr.getvalue().strip().splitlines()[-1]}
    return json.loads((out / "compare.json").read_text())


def run_probe(out: Path, recipe: dict, probes: str,
              code: Callable[[], contextlib.AbstractContextManager] | None) -> dict:
    """``inca-probe`` of the recipe's backbone and tasks into ``out`` (resuming), under ``code``; its probe.json."""
    argv = ["--backbone", recipe["backbone"], "--weights", recipe["weights"], "--model-kwargs",
            *(f"{k}={v}" for k, v in recipe["model_kwargs"].items()), "--device", recipe["device"],
            "--tasks", ",".join(recipe["tasks"]), "--probes", probes, "--out", str(out), "--quiet"]
    with code() if code is not None else contextlib.nullcontext(), contextlib.redirect_stdout(io.StringIO()):
        if probe_main(argv):
            raise SystemExit(f"inca-probe failed for {out}")
    return json.loads((out / "probe.json").read_text())


def _by_pair(summary: dict, value: Callable[[dict], object]) -> dict[tuple[str, str], object]:
    """``value`` of each compare.json result, by (task, method)."""
    return {(r["task"], r["method"]): value(r) for r in summary.get("results", [])}


def _accuracies(summary: dict) -> dict[tuple[str, str], float]:
    return _by_pair(summary, lambda r: r["test_acc"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def shows(fix: Fix) -> str:
    """Whether the demo setting can show the fix's effect, and why."""
    return f"This setting {'can' if fix.visible else 'cannot'} show its effect: {fix.why}."


def blind_spots() -> str:
    """The fixes whose effect the demo setting cannot show, named in the report's header."""
    blind = [fix.name for fix in FIXES if not fix.visible]
    return (f"This setting cannot show the effect of {len(blind)} fixes ({', '.join(blind)}): their tables show no "
            "change in accuracy, which says nothing about whether the fix matters where it can act; each section "
            "says why.")


def fix_section(fix: Fix, before: dict, after: dict, tasks: list[str]) -> list[str]:
    lines = [f"### {fix.name}", "", f"{fix.what}. {shows(fix)}", ""]
    reverted = [*fix.flags, *(["--method-args", *fix.method_args] if fix.method_args else [])]
    how = [f"`{' '.join(reverted)}`"] if reverted else []
    how += [f"the old code ({code.__doc__.split(':', 1)[1].strip().rstrip('.')})" for code in fix.code]
    lines += ["Reverted by " + " and ".join(how) + ".", ""]
    if "error" in before:
        return [*lines, f"Before, `inca-compare` stopped: `{before['error']}`", ""]
    old, new = _accuracies(before), _accuracies(after)
    epochs = [_by_pair(s, lambda r: r["best_epoch"]) for s in (before, after)]
    losses = [_by_pair(s, lambda r: f"{r['loss_curve'][-1]:.4f}") for s in (before, after)]
    lines += ["| task | method | before | after | after - before | best epoch before / after | final train loss "
              "before / after |", "|---|---|---|---|---|---|---|"]
    deltas = []
    for task in tasks:
        for method in fix.methods:
            b, a = old.get((task, method)), new.get((task, method))
            if a is not None and b is not None:
                deltas.append(a - b)
            delta = f"{a - b:+.3f}" if a is not None and b is not None else "-"
            best = " / ".join(str(e.get((task, method), "-")) for e in epochs)
            loss = " / ".join(x.get((task, method), "-") for x in losses)
            lines.append(f"| {task} | {method} | {_fmt(b)} | {_fmt(a)} | {delta} | {best} | {loss} |")
    if deltas:
        lines += ["", f"Mean change {np.mean(deltas):+.3f} over {len(deltas)} pairs; "
                      f"{sum(d > 0 for d in deltas)} up, {sum(d < 0 for d in deltas)} down, "
                      f"{sum(d == 0 for d in deltas)} unchanged."]
    return [*lines, ""]


def knn_section(tasks: list[str], runs: dict[str, dict]) -> list[str]:
    """The linear probe's test accuracy per layer when it runs alone, after kNN (fixed), after kNN (old)."""
    lines = ["### knn-copies", "", "kNN normalises copies of the recorded pooled features (before: the features "
             "themselves, in place, so a linear probe after it trained on L2-normalised features). Linear probe "
             "(CLS token) test accuracy per layer of `inca-probe --probes linear` against `--probes knn,linear` "
             "with the fix and with the old in-place kNN. This setting can show its effect: the before column "
             "differs wherever the normalised features change the linear probe.", "",
             "| task | layer | linear alone | knn,linear (after) | knn,linear (before) |", "|---|---|---|---|---|"]
    for task in tasks:
        alone, after, before = (_linear_by_layer(runs[name], task) for name in ("alone", "after", "before"))
        for layer in sorted(alone):
            lines.append(f"| {task} | {layer} | {_fmt(alone[layer])} | {_fmt(after[layer])} | "
                         f"{_fmt(before[layer])} |")
    return [*lines, ""]


def _linear_by_layer(report: dict, task: str) -> dict[int, float]:
    results = report["tasks"][task]["results"]["linear/cls"]
    return {int(layer): scores["test"] for layer, scores in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/fixes", help="one output directory per run, resumed by a rerun")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "fixes.md"), help="the Markdown report to write")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: faster on 2 shared cores, and the same for every run
    out = Path(args.out)
    recipe = yaml.safe_load(RECIPE.read_text())
    tasks = recipe["tasks"]
    after = run_compare(out / "after", recipe["methods"], None)
    sections = [section for fix in FIXES for section in fix_section(fix, run_compare(out / fix.name, fix.methods, fix),
                                                                   after, tasks)]
    sections += fix_section(EVERY_FIX, run_compare(out / EVERY_FIX.name, EVERY_FIX.methods, EVERY_FIX), after, tasks)
    knn = {"alone": run_probe(out / "probe-linear", recipe, "linear", None),
           "after": run_probe(out / "probe-knn-linear", recipe, "knn,linear", None),
           "before": run_probe(out / "probe-knn-linear-before", recipe, "knn,linear", knn_in_place)}
    sections += knn_section(tasks, knn)
    header = [
        "# Each fix, before and after", "",
        "Generated by `python tools/ablate_fixes.py` (its docstring says how each fix is reverted). Every table is "
        f"the demo comparison (`{RECIPE.relative_to(ROOT)}`: {recipe['backbone']} with "
        f"{' '.join(f'{k}={v}' for k, v in recipe['model_kwargs'].items())}, **random weights**, tasks "
        f"{', '.join(tasks)}, {recipe['epochs']} epochs, batch {recipe['batch_size']}, seed {recipe['seed']}) with "
        "one fix reverted (before) and with every fix in (after): test accuracy at the best-validation epoch "
        "(InCA's before: its last epoch where that is the fix). One seed on a random backbone: differences of a "
        "few points are within noise; what a table shows is whether and how much a fix moves the numbers.",
        "", blind_spots(), "", f"Machine: {platform.machine()}, torch {torch.__version__}, one thread.", "",
        "## The comparison with every fix in", "",
        "| task | " + " | ".join(recipe["methods"]) + " |", "|---|" + "---|" * len(recipe["methods"]),
        *(f"| {task} | " + " | ".join(_fmt(_accuracies(after).get((task, m))) for m in recipe["methods"]) + " |"
          for task in tasks),
        "", "## One fix at a time", "",
    ]
    atomic_write_text(Path(args.doc), "\n".join(header + sections))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
