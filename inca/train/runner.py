"""One InCA run per task: the adapter grid becomes one bank, trained on cached or live activations.

The grid (layers x learning rates x weight decays x queries x heads x MLP ratios x seeds) is one
:class:`~inca.adapters.inca.InCABank` per task; its best adapter on the validation split is saved with
its metadata and reported with its test accuracy, next to every other adapter's figures.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..activations import CachedSource, LiveSource
from ..adapters.inca import AdapterSpec, InCABank, save_adapter
from ..backbone import Backbone
from ..cache import build_cache, cache_root, find_cache, store_bytes
from ..errors import InCAError
from ..io import atomic_write_json, atomic_write_text, read_json
from ..report import markdown_table
from ..tasks import Task
from .bank import evaluate_bank, select_best, train_bank

_logger = logging.getLogger(__name__)

CACHE_MODES = ("auto", "always", "never")
CHECKPOINT_FILE = "checkpoint.safetensors"
ADAPTER_DIR = "adapter"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


@dataclass
class InCAOptions:
    """Everything about an InCA run except the backbone, the task and the layers."""

    lr: list[float] = field(default_factory=lambda: [1e-3])
    weight_decay: list[float] = field(default_factory=lambda: [1e-4])
    queries: list[int] = field(default_factory=lambda: [1])
    heads: list[int] = field(default_factory=list)  # empty: the backbone's number of heads
    mlp_ratio: list[float] = field(default_factory=lambda: [0.0])
    adapter_seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 10
    batch_size: int = 64
    warmup_ratio: float = 0.1
    seed: int = 0
    cache: str = "auto"
    cache_dir: str | None = None
    cache_dtype: str = "float16"
    cache_max_gb: float = 64.0
    num_workers: int | None = None

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise InCAError(f"--cache {self.cache!r} is not one of {', '.join(CACHE_MODES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InCAError(f"--epochs ({self.epochs}) and --batch-size ({self.batch_size}) must be positive")
        for name in ("lr", "weight_decay", "queries", "mlp_ratio", "adapter_seeds"):
            if not getattr(self, name):
                raise InCAError(f"--{name.replace('_', '-')} needs at least one value")
        if any(lr <= 0 for lr in self.lr):
            raise InCAError(f"learning rates must be positive, got {self.lr}")

    def grid(self, layers: list[int], default_heads: int) -> list[AdapterSpec]:
        """One spec per combination, layer-major (the order of the results table)."""
        heads = self.heads or [default_heads]
        combos = itertools.product(
            layers, self.lr, self.weight_decay, self.queries, heads, self.mlp_ratio, self.adapter_seeds
        )
        return [
            AdapterSpec(layer=layer, num_heads=h, num_queries=q, mlp_ratio=float(m), lr=float(lr),
                        weight_decay=float(wd), seed=int(s))
            for layer, lr, wd, q, h, m, s in combos
        ]


def activation_source(
    backbone: Backbone, task: Task, layers: list[int], options: InCAOptions
) -> CachedSource | LiveSource:
    """A store when one exists or is worth building (``--cache auto``: several epochs, fits the budget
    and the disk), else activations streamed from the live backbone."""
    if options.cache == "never":
        return LiveSource(backbone, task, layers, options.num_workers)
    found = find_cache(options.cache_dir, backbone, task, layers)
    if found is not None:
        _logger.info("%s: reading activations from %s", task.spec, found.path)
        return CachedSource(found, layers)
    if options.cache == "auto":
        reason = _why_not_cache(store_bytes(backbone, task, layers, options.cache_dtype), options)
        if reason:
            _logger.info("%s: streaming live activations (%s)", task.spec, reason)
            return LiveSource(backbone, task, layers, options.num_workers)
    cache = build_cache(backbone, task, layers, options.cache_dir, dtype=options.cache_dtype,
                        num_workers=options.num_workers)
    return CachedSource(cache, layers)


def _why_not_cache(size: int, options: InCAOptions) -> str | None:
    if options.epochs == 1:
        return "one epoch: a store would be read only once"
    if size > options.cache_max_gb * 1e9:
        return f"a store would take {size / 1e9:.1f} GB > --cache-max-gb {options.cache_max_gb:g}"
    root = cache_root(options.cache_dir)
    probe = next((p for p in [root, *root.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if size > 0.5 * free:
        return f"a store would take {size / 1e9:.1f} GB of {free / 1e9:.1f} GB free disk"
    return None


def train_inca_task(
    backbone: Backbone,
    task: Task,
    layers: list[int],
    options: InCAOptions,
    out_dir: str | os.PathLike,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train the grid's bank on ``task``, save the best adapter (by val) under ``out_dir/adapter``.

    Resumes from ``out_dir/checkpoint.safetensors`` after an interruption; returns the task's results.
    """
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else backbone.device
    start = time.perf_counter()
    specs = options.grid(layers, backbone.num_heads)
    source = activation_source(backbone, task, layers, options)
    bank = InCABank(specs, backbone.width, task.num_classes)
    _logger.info("%s: training %d adapters together on layers %s", task.spec, len(specs), layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT_FILE
    cached = isinstance(source, CachedSource)
    history = train_bank(
        bank, source, epochs=options.epochs, batch_size=options.batch_size, device=device, seed=options.seed,
        warmup_ratio=options.warmup_ratio, eval_split="val" if cached else None, checkpoint_path=checkpoint,
    )
    best, val_acc = select_best(bank, source, "val")
    test_acc = evaluate_bank(bank, source, "test")
    adapter = bank.adapter(best)
    spec = specs[best]
    save_adapter(adapter, out_dir / ADAPTER_DIR, {
        "backbone": backbone.describe(),
        "layer": spec.layer,
        "classes": task.classes,
        "task": task.spec,
        "hyperparameters": {**asdict(spec), "epochs": options.epochs, "batch_size": options.batch_size},
        "val_accuracy": float(val_acc[best]),
        "test_accuracy": float(test_acc[best]),
    })
    checkpoint.unlink(missing_ok=True)  # the results and the adapter are written: nothing left to resume
    trainable = sum(p.numel() for p in adapter.parameters())
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    adapters = [
        {**asdict(s), "val_acc": _num(val_acc[i]), "test_acc": _num(test_acc[i]), "diverged": bool(bank.diverged[i]),
         "final_train_loss": _num(history.train_loss[-1][i])}
        for i, s in enumerate(specs)
    ]
    steps = options.epochs * -(-source.num_rows("train") // options.batch_size)
    return {
        "task": task.spec,
        "classes": task.classes,
        "sizes": task.sizes(),
        "layers": layers,
        "activations": "cache" if cached else "live",
        "cache_path": str(source.cache.path) if cached else None,
        "adapters": adapters,
        "best": {"index": best, **adapters[best], "adapter_dir": str(out_dir / ADAPTER_DIR)},
        "val_acc": adapters[best]["val_acc"],
        "test_acc": adapters[best]["test_acc"],
        "trainable_params": trainable,
        "backbone_params": backbone_params,
        "trainable_percent": 100.0 * trainable / backbone_params,
        "steps": steps,
        "loss_curve": [epoch[best] for epoch in history.train_loss],
        "seconds": time.perf_counter() - start,
    }


def _num(value: Any) -> float | None:
    """A JSON-safe float: NaN (diverged) becomes null."""
    value = float(value)
    return None if value != value else value


def config_fingerprint(backbone: Backbone, layers_spec: str, options: InCAOptions) -> dict[str, Any]:
    """What must match for a finished task's results to be reused by a rerun."""
    keep = {k: v for k, v in asdict(options).items() if k not in ("cache", "cache_dir", "num_workers")}
    return {"backbone": backbone.fingerprint, "layers": str(layers_spec), **keep}


def run_suite(
    backbone: Backbone,
    task_specs: list[str],
    layers_for: Callable[[Task], list[int]],
    layers_spec: str,
    options: InCAOptions,
    out: str | os.PathLike,
    load_task: Callable[[str], Task],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tasks one after another on one loaded backbone; ``results.json`` / ``results.md`` are rewritten
    atomically after each task, and a rerun with the same configuration skips the finished ones.

    Results of another configuration in ``out`` are never silently replaced: that needs ``overwrite``.
    """
    out = Path(out)
    results_file = out / RESULTS_JSON
    config = config_fingerprint(backbone, layers_spec, options)
    results: dict[str, Any] = {"backbone": backbone.describe(), "config": config, "tasks": {}}
    if results_file.is_file():
        previous = read_json(results_file)
        if previous.get("config") == config:
            results["tasks"] = previous.get("tasks", {})
        elif not overwrite:
            differ = sorted(k for k in config if previous.get("config", {}).get(k) != config[k])
            raise InCAError(
                f"{out} holds results of another configuration (differs in {', '.join(differ)}): "
                "use another --out, or --overwrite to replace them"
            )
    for spec in task_specs:
        if spec in results["tasks"]:
            _logger.info("%s: finished in an earlier run, skipped (delete %s to redo it)", spec, results_file)
            continue
        task = load_task(spec)
        result = train_inca_task(backbone, task, layers_for(task), options, out / task.slug)
        results["tasks"][spec] = result
        write_results(out, results)
        _logger.info("%s: best layer %d, val %.4f, test %.4f (%.1fs)", spec, result["best"]["layer"],
                     result["val_acc"], result["test_acc"], result["seconds"])
    write_results(out, results)
    return results


def write_results(out: Path, results: dict[str, Any]) -> None:
    atomic_write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, render_results(results))


def render_results(results: dict[str, Any]) -> str:
    """The summary table (best adapter per task) then, per task, every adapter of its bank."""
    backbone = results["backbone"]
    lines = [f"# InCA results: {backbone['name']} ({backbone['weights']} weights)\n"]
    rows = [
        [spec, r["best"]["layer"], r["best"]["lr"], r["best"]["num_queries"], r["val_acc"], r["test_acc"],
         r["trainable_params"], f"{r['trainable_percent']:.2f}%", len(r["adapters"]), r["activations"],
         f"{r['seconds']:.1f}"]
        for spec, r in results["tasks"].items()
    ]
    lines.append(markdown_table(
        ["task", "best layer", "lr", "queries", "val acc", "test acc", "params", "% backbone", "adapters",
         "activations", "seconds"], rows))
    for spec, r in results["tasks"].items():
        lines.append(f"## {spec}\n")
        lines.append(markdown_table(
            ["layer", "lr", "wd", "queries", "heads", "mlp", "seed", "val acc", "test acc", "diverged"],
            [[a["layer"], a["lr"], a["weight_decay"], a["num_queries"], a["num_heads"], a["mlp_ratio"], a["seed"],
              a["val_acc"], a["test_acc"], "yes" if a["diverged"] else ""] for a in r["adapters"]],
        ))
    return "\n".join(lines)
