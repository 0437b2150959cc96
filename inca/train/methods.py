"""The comparison methods: what each trains, its default hyper-parameters, and one entry point to run it.

Every end-to-end method starts from a trainable copy of the frozen backbone (timm model + a new head for the
task, drawn under the run's seed), says which parameters train (``prepare``) and trains with the one loop of
:mod:`inca.train.e2e`. ``inca`` is the odd one out: it trains a bank of InCA adapters on the live backbone
through :func:`inca.train.runner.train_inca_task`, a separate trainer this module only calls.

Hyper-parameters are one table, :data:`DEFAULTS`; ``--method-args method.key=value`` overrides any entry
(:func:`resolve_methods`), and an unknown method or key is a one-line error naming it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import nn

from inca.adapters.common import DEFAULT_TARGET, count_parameters, head_parameters, set_trainable
from inca.adapters.compacter import apply_compacter
from inca.adapters.lora import apply_lora
from inca.adapters.lora_ga import init_lora_ga
from inca.backbone import Backbone, resolve_layers
from inca.errors import InCAError
from inca.tasks import SPLITS, Task
from inca.train.bank import epoch_batches
from inca.train.e2e import Batches, FitConfig, FitResult, ImageBatches, batch_loss, fit, pooled_features, trainable_copy
from inca.train.runner import InCAOptions, train_inca_task

__all__ = [
    "DEFAULTS",
    "METHODS",
    "Method",
    "RunSettings",
    "build_model",
    "parse_method_args",
    "resolve_methods",
    "run_method",
    "train_e2e",
]

# Default hyper-parameters of every method, from its paper where the paper fixes one; "(ours)" marks a value
# no paper prescribes for this setting. lr / weight_decay / warmup_ratio feed AdamW and the cosine schedule
# with linear warm-up shared by all end-to-end methods; epochs, batch size and seed are shared by all methods.
#   full        lr 1e-4: LoRA-GA (Wang et al., 2024) trains full fine-tuning, LoRA and LoRA-GA at lr 1e-4 on
#               T5-base/GLUE (authors' conf/model/t5base.yaml); weight decay 0.01, warm-up 0.1 (ours).
#   lora        rank 8, alpha 8 (s = 1), lr 5e-4, warm-up ratio 0.06, no dropout: LoRA (Hu et al., 2021),
#               Table 9 (RoBERTa-base, GLUE). Targets: DESIGN.md's default (qkv, proj, fc1, fc2 of every block).
#   lora-ga     rank 8, alpha 16 with rsLoRA (s = alpha/sqrt(r)), gamma 16, direction ArB2r, "stable" scale,
#               gradient from 8 batches (authors' conf/init/gradient.yaml: iters 8), lr 1e-4 = full
#               fine-tuning's: LoRA-GA (Wang et al., 2024), Section 4 and the authors' code. LoRA-GA starts
#               on full fine-tuning's trajectory, so its best lr is near full fine-tuning's, not LoRA's.
#   compacter   phm_dim n = 4, rank 1, reduction 32, LayerNorms trained, lr 3e-3 (the paper's lr for all
#               adapter methods; 3e-4 for T5 fine-tuning): Compacter (Mahabadi et al., 2021), Section 4.
#   compacter++ as compacter, adapters after the MLP only (same paper).
#   linear      lr 1e-3, weight decay 0, CLS token (ours: no paper's setting applies to this probe).
#   inca        one query, the backbone's number of heads (heads []), no MLP: InCA (Dukler et al., 2023) and
#               DESIGN.md; one adapter per layer in one bank, the best chosen on val (ours); lr 1e-3, weight
#               decay 1e-4, warm-up 0.1, activation cache "auto": inca.train.runner.InCAOptions' defaults.
#               lr / weight_decay / queries / heads / mlp_ratio are lists: the bank trains their grid.
DEFAULTS: dict[str, dict[str, Any]] = {
    "inca": {"layers": "all", "lr": [1e-3], "weight_decay": [1e-4], "warmup_ratio": 0.1, "queries": [1],
             "heads": [], "mlp_ratio": [0.0], "cache": "auto"},
    "lora": {"lr": 5e-4, "weight_decay": 0.01, "warmup_ratio": 0.06, "rank": 8, "alpha": 8.0, "rslora": False,
             "dropout": 0.0, "target": DEFAULT_TARGET},
    "lora-ga": {"lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.1, "rank": 8, "alpha": 16.0, "rslora": True,
                "dropout": 0.0, "target": DEFAULT_TARGET, "gamma": 16.0, "direction": "ArB2r", "scale": "stable",
                "init_batches": 8},
    "compacter": {"lr": 3e-3, "weight_decay": 0.01, "warmup_ratio": 0.1, "phm_dim": 4, "rank": 1, "reduction": 32,
                  "train_norms": True},
    "compacter++": {"lr": 3e-3, "weight_decay": 0.01, "warmup_ratio": 0.1, "phm_dim": 4, "rank": 1,
                    "reduction": 32, "train_norms": True},
    "full": {"lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.1},
    "linear": {"lr": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.1, "pool": "cls"},
}  # fmt: skip


@dataclass(frozen=True)
class RunSettings:
    """What every method of a comparison shares: epochs, batch size (train and eval) and seed."""

    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    num_workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InCAError(f"epochs ({self.epochs}) and batch size ({self.batch_size}) must be positive")


@dataclass(frozen=True)
class PrepareContext:
    """What a method's ``prepare`` may need beyond its hyper-parameters (LoRA-GA: training batches)."""

    data: Batches
    batch_size: int
    seed: int
    device: torch.device

    def train_batches(self, count: int) -> Iterator:
        """The first ``count`` batches of epoch 1, in the order training will see them."""
        order = epoch_batches(self.data.num_rows("train"), self.batch_size, self.seed, 0)
        return iter(self.data.loader("train", order[:count]))


def _prepare_full(model: nn.Module, hp: Mapping[str, Any], ctx: PrepareContext) -> None:
    set_trainable(model, model.parameters())


def _prepare_linear(model: nn.Module, hp: Mapping[str, Any], ctx: PrepareContext) -> None:
    set_trainable(model, head_parameters(model))


def _prepare_lora(model: nn.Module, hp: Mapping[str, Any], ctx: PrepareContext) -> None:
    apply_lora(model, hp["rank"], hp["alpha"], hp["target"], hp["rslora"], hp["dropout"])


def _prepare_lora_ga(model: nn.Module, hp: Mapping[str, Any], ctx: PrepareContext) -> None:
    if hp["init_batches"] < 1:
        raise InCAError(f"lora-ga.init_batches must be at least 1, got {hp['init_batches']}")
    _prepare_lora(model, hp, ctx)
    init_lora_ga(
        model, ctx.train_batches(hp["init_batches"]), functools.partial(batch_loss, device=ctx.device),
        hp["gamma"], hp["direction"], hp["scale"], ctx.seed,
    )  # fmt: skip


def _prepare_compacter(model: nn.Module, hp: Mapping[str, Any], ctx: PrepareContext, plus: bool) -> None:
    apply_compacter(model, hp["phm_dim"], hp["rank"], hp["reduction"], plus, hp["train_norms"])


@dataclass(frozen=True)
class Method:
    """One comparison method. ``run(backbone, task, hparams, settings, work_dir) -> metrics``.

    End-to-end methods have a ``prepare(model, hparams, context)`` that makes a fresh trainable copy train
    what the method trains; ``features_only`` trains the head on pooled features computed once;
    ``shares_backbone`` marks a method that runs on the live frozen backbone instead of its own copy (its
    memory footprint includes the backbone's weights).
    """

    name: str
    run: Callable[..., dict[str, Any]]
    prepare: Callable[[nn.Module, Mapping[str, Any], PrepareContext], None] | None = None
    features_only: bool = False
    shares_backbone: bool = False


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's RNGs seeded for one method (same head, adapter init and dropout for a seed), restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def build_model(
    name: str, backbone: Backbone, num_classes: int, hparams: Mapping[str, Any], data: Batches, settings: RunSettings
) -> nn.Module:
    """A trainable copy of the backbone for end-to-end method ``name`` (``data``: LoRA-GA's init batches)."""
    method = METHODS[name]
    if method.prepare is None:
        raise InCAError(f"method {name!r} does not train a copy of the backbone")
    model = trainable_copy(backbone, num_classes, pool=hparams.get("pool"))
    method.prepare(model, hparams, PrepareContext(data, settings.batch_size, settings.seed, backbone.device))
    return model


def train_e2e(
    name: str, backbone: Backbone, task: Task, hparams: Mapping[str, Any], settings: RunSettings
) -> tuple[nn.Module, FitResult]:
    """Train end-to-end method ``name`` on ``task``: the trained timm model and its :class:`FitResult`."""
    method = METHODS[name]
    data = ImageBatches(task, backbone, settings.num_workers)
    config = FitConfig(
        settings.epochs, settings.batch_size, float(hparams["lr"]), float(hparams["weight_decay"]),
        float(hparams["warmup_ratio"]), settings.seed, settings.progress, desc=f"{name} on {task.spec}",
    )  # fmt: skip
    with _seeded(settings.seed, backbone.device):
        model = build_model(name, backbone, task.num_classes, hparams, data, settings)
        if method.features_only:
            features = pooled_features(model, data, settings.batch_size, SPLITS)
            return model, fit(model.get_classifier(), features, config)
        return model, fit(model, data, config)


def _run_e2e(
    name: str, backbone: Backbone, task: Task, hparams: Mapping[str, Any], settings: RunSettings,
    work_dir: str | os.PathLike,
) -> dict[str, Any]:  # fmt: skip
    model, result = train_e2e(name, backbone, task, hparams, settings)
    return {
        "test_acc": result.test_acc,
        "val_acc": result.val_acc,
        "best_epoch": result.best_epoch,
        "trainable_params": count_parameters(model).trainable,
        "steps": result.steps,
        "val_curve": result.val_curve,
        "loss_curve": result.loss_curve,
        "diverged_at_step": result.diverged_at_step,
    }


def _run_inca(
    name: str, backbone: Backbone, task: Task, hparams: Mapping[str, Any], settings: RunSettings,
    work_dir: str | os.PathLike,
) -> dict[str, Any]:  # fmt: skip
    layers = resolve_layers(hparams["layers"], backbone.num_blocks)
    options = InCAOptions(
        **{key: value for key, value in hparams.items() if key != "layers"},
        adapter_seeds=[settings.seed], epochs=settings.epochs, batch_size=settings.batch_size, seed=settings.seed,
        num_workers=settings.num_workers,
    )  # fmt: skip
    result = train_inca_task(backbone, task, layers, options, work_dir)
    return {
        "test_acc": float(result["test_acc"]),
        "val_acc": float(result["val_acc"]),
        "trainable_params": int(result["trainable_params"]),
        "steps": int(result["steps"]),
        "loss_curve": [float(x) for x in result["loss_curve"]],  # one value per epoch (the bank trainer's)
        "activations": result["activations"],  # "cache" (a store, maybe built by an earlier run) or "live"
        "best": json.loads(json.dumps(result["best"], default=str)),
    }


METHODS: dict[str, Method] = {
    "inca": Method("inca", _run_inca, shares_backbone=True),
    "lora": Method("lora", _run_e2e, _prepare_lora),
    "lora-ga": Method("lora-ga", _run_e2e, _prepare_lora_ga),
    "compacter": Method("compacter", _run_e2e, functools.partial(_prepare_compacter, plus=False)),
    "compacter++": Method("compacter++", _run_e2e, functools.partial(_prepare_compacter, plus=True)),
    "full": Method("full", _run_e2e, _prepare_full),
    "linear": Method("linear", _run_e2e, _prepare_linear, features_only=True),
}


def run_method(
    name: str, backbone: Backbone, task: Task, hparams: Mapping[str, Any], settings: RunSettings,
    work_dir: str | os.PathLike,
) -> dict[str, Any]:  # fmt: skip
    """Train method ``name`` on ``task``: test/val accuracy (best epoch by val), trainable parameters, steps,
    per-step training loss, ... (a JSON-ready dict). ``work_dir`` is where a method may write files."""
    return METHODS[name].run(name, backbone, task, hparams, settings, work_dir)


def _unknown(kind: str, name: str, valid: Sequence[str]) -> InCAError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return InCAError(f"unknown {kind} {name!r}{hint}; choose from {', '.join(valid)}")


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the table's ``default`` (YAML reads ``1e-3`` as a string, ``3`` as an int)."""
    bad = InCAError(f"{method}.{key} expects a {type(default).__name__} like {default!r}, got {value!r}")
    if default is None:
        return value
    if isinstance(default, list):  # a grid: one value or several
        values = value if isinstance(value, list) else [value]
        return [_coerce(method, key, v, default[0] if default else None) for v in values]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)  # layers: [0, 5] -> "0,5"


def parse_method_args(
    items: Sequence[str | Mapping[str, Any]] | Mapping[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    """``["lora.rank=4", "linear.pool=mean"]`` and/or a recipe's ``{lora: {rank: 4}}`` -> checked, typed
    overrides per method; later items win. Values are YAML scalars; an unknown method or key is an error."""
    pairs: list[tuple[str, Any, str]] = []
    for item in [items] if isinstance(items, Mapping) else items or []:
        if isinstance(item, Mapping):
            for method, keys in item.items():
                if not isinstance(keys, Mapping):
                    raise InCAError(f"method_args.{method} must map hyper-parameters to values, e.g. {{rank: 4}}")
                pairs += [(f"{method}.{key}", value, f"{method}.{key}") for key, value in keys.items()]
            continue
        target, sep, value = str(item).partition("=")
        if not sep:
            raise InCAError(f"--method-args expects method.key=value, got {item!r} (e.g. lora.rank=4)")
        pairs.append((target.strip(), yaml.safe_load(value), str(item)))
    overrides: dict[str, dict[str, Any]] = {}
    for target, value, item in pairs:
        method, dot, key = target.rpartition(".")
        if not dot or not method or not key:
            raise InCAError(f"--method-args expects method.key=value, got {item!r} (e.g. lora.rank=4)")
        if method not in DEFAULTS:
            raise _unknown("method", method, list(DEFAULTS)) from None
        if key not in DEFAULTS[method]:
            close = difflib.get_close_matches(key, list(DEFAULTS[method]), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InCAError(f"method {method!r} has no hyper-parameter {key!r}{hint}; its keys: "
                            f"{', '.join(DEFAULTS[method])}")
        overrides.setdefault(method, {})[key] = _coerce(method, key, value, DEFAULTS[method][key])
    return overrides


def resolve_methods(
    names: str | Sequence[str], method_args: Sequence[str] | Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The chosen methods, in order, each with its full hyper-parameters (defaults + overrides).

    Checks names, override keys and types up front, before anything trains.
    """
    items = [names] if isinstance(names, str) else list(names)
    chosen = list(dict.fromkeys(part.strip() for item in items for part in str(item).split(",") if part.strip()))
    if not chosen:
        raise InCAError(f"no methods given: pass --methods, e.g. --methods {','.join(METHODS)}")
    for name in chosen:
        if name not in METHODS:
            raise _unknown("method", name, list(METHODS))
    overrides = parse_method_args(method_args)
    return {name: {**DEFAULTS[name], **overrides.get(name, {})} for name in chosen}
