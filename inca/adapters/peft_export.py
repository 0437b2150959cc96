"""PEFT interop: a LoRA (or LoRA-GA) timm model as a self-contained PEFT LoRA adapter directory.

:func:`export_peft` writes PEFT's two files (``adapter_config.json``, ``adapter_model.safetensors``) and, given
the :class:`~inca.backbone.Backbone` the model was trained from, what rebuilds that exact base model:
``base_model.json`` (timm name, model kwargs, weights kind and hash, the head's ``reset_classifier`` arguments),
``base_model.safetensors`` when the weights are random or a local file (anything but the hub's), and a
``README.md`` with the loading recipe (:data:`LOAD_RECIPE`: timm, safetensors and PEFT alone).
:func:`load_peft_export` does the same in one call and checks the weights' hash.

inca's record is a file of its own, not extra keys of ``adapter_config.json``: PEFT warns about keys it does
not know, and would tell the user to upgrade PEFT.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from inca.adapters.common import classifier_modules, logit_layers
from inca.adapters.lora import lora_layers
from inca.backbone import Backbone, create_backbone
from inca.errors import InCAError
from inca.io import atomic_write, atomic_write_json, atomic_write_text, read_json_file
from inca.options import POOLS

__all__ = [
    "BASE_RECORD_FILE",
    "BASE_STATE_FILE",
    "LOAD_RECIPE",
    "PEFT_CONFIG_FILE",
    "PEFT_WEIGHTS_FILE",
    "export_peft",
    "load_peft_export",
]

logger = logging.getLogger(__name__)

PEFT_CONFIG_FILE = "adapter_config.json"  # PEFT's CONFIG_NAME and SAFETENSORS_WEIGHTS_NAME
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
BASE_RECORD_FILE = "base_model.json"
BASE_STATE_FILE = "base_model.safetensors"
README_FILE = "README.md"
_PEFT_PREFIX = "base_model.model."

# How to load an export with timm, safetensors and PEFT alone, ``DIR`` being the export directory. The README's
# "Comparing methods" section shows these lines, and each export's README.md carries them.
LOAD_RECIPE = """\
import json
from pathlib import Path

import timm
from peft import PeftModel
from safetensors.torch import load_file

base = json.loads(Path(DIR, "base_model.json").read_text())
model = timm.create_model(base["model_name"], pretrained=base["state_file"] is None, num_classes=0,
                          **base["model_kwargs"])
if base["state_file"]:  # random or local weights travel with the export; the hub's come from the hub
    model.load_state_dict(load_file(Path(DIR, base["state_file"])))
model.reset_classifier(**base["reset_classifier"])
model = PeftModel.from_pretrained(model, DIR).eval()
"""


def export_peft(
    model: nn.Module, directory: str | os.PathLike, backbone: Backbone | None = None, head_pool: str | None = None
) -> None:
    """Write a LoRA (or LoRA-GA) timm model as a PEFT LoRA adapter directory.

    ``backbone``: the backbone ``model`` was copied from (:func:`inca.train.e2e.trainable_copy` with
    ``head_pool``); its record, and its weights unless they are the hub's, go with the adapter so that
    :data:`LOAD_RECIPE` or :func:`load_peft_export` rebuild the exact base model. Without it only PEFT's two
    files are written, for a base model the caller builds. The head goes in ``modules_to_save``. A shifted
    base (LoRA-GA: ``W' = W - s B0 A0``) is exported relative to the original ``W`` as one LoRA of rank 2r:
    ``s (B A - B0 A0) = s [B, -B0] [A; A0]``, with ``lora_alpha`` adjusted so that PEFT's scale for rank 2r
    is still ``s``. Merged layers export the same way.
    """
    layers = lora_layers(model)
    if not layers:
        raise InCAError("the model has no LoRA layers to export; call apply_lora(model) first")
    first = next(iter(layers.values()))
    if len({layer.shifted for layer in layers.values()}) > 1:
        raise InCAError("only some LoRA layers have a shifted base weight; export a model initialised as a whole")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        if layer.shifted:
            A, B = torch.cat([A, layer.lora_A0]), torch.cat([B, -layer.lora_B0], dim=1)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B
    rank, alpha = first.rank, first.alpha
    if first.shifted:  # PEFT's scale at rank 2r must stay ours: alpha / r, or alpha / sqrt(r) with rsLoRA
        rank, alpha = 2 * rank, alpha * (math.sqrt(2) if first.rslora else 2)
    head_names = []
    for head in classifier_modules(model):  # two for a distilled DeiT
        if head.state_dict():
            head_names.append(_module_name(model, head))
            tensors.update({f"{_PEFT_PREFIX}{head_names[-1]}.{k}": v for k, v in head.state_dict().items()})
    directory = Path(directory)
    base_name = None
    if backbone is not None:
        num_classes = getattr(logit_layers(model)[0], "out_features", 0)  # 0: timm's headless nn.Identity
        base_name = _write_base(directory, backbone, num_classes, head_pool)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": first.rslora,
        "lora_dropout": first.dropout,
        "target_modules": list(layers),
        "modules_to_save": head_names or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / PEFT_CONFIG_FILE, config)
    logger.info("PEFT LoRA adapter (r=%d, %d layers%s) written to %s", rank, len(layers),
                ", base shift folded in" if first.shifted else "", directory)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _hub_name(backbone: Backbone) -> str:
    """PEFT's ``base_model_name_or_path``: the hub repository of timm's pretrained weights (``timm/NAME.TAG``),
    else the timm model name."""
    if backbone.weights == "pretrained":
        cfg = timm.models.get_pretrained_cfg(backbone.name)
        if cfg is not None and cfg.hf_hub_id:
            return cfg.hf_hub_id
    return backbone.name


def _write_base(directory: Path, backbone: Backbone, num_classes: int, head_pool: str | None) -> str:
    """Write what rebuilds the base model (record, weights unless the hub's, README); return its hub name."""
    kind = backbone.weights if backbone.weights in ("pretrained", "random") else "file"
    head: dict[str, Any] = {"num_classes": num_classes}
    if head_pool is not None:
        head["global_pool"] = POOLS[head_pool]
    record = {
        "model_name": backbone.name,
        "model_kwargs": backbone.model_kwargs,
        "weights": kind,
        **({"weights_file": backbone.weights} if kind == "file" else {}),
        "weights_hash": backbone.weights_hash,
        "state_file": None if kind == "pretrained" else BASE_STATE_FILE,
        "reset_classifier": head,
    }
    if record["state_file"]:
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in backbone.model.state_dict().items()}
        atomic_write(directory / BASE_STATE_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    name = _hub_name(backbone)
    atomic_write_json(directory / BASE_RECORD_FILE, record)
    atomic_write_text(directory / README_FILE, _readme(name, record))
    return name


def _readme(name: str, record: dict[str, Any]) -> str:
    front = ["---", "library_name: peft", *([f"base_model: {name}"] if record["weights"] == "pretrained" else []),
             "---"]
    weights = {"pretrained": "the hub's pretrained weights", "random": "timm's initialisation under inca's seed "
               f"(in {BASE_STATE_FILE})", "file": f"a local weights file (in {BASE_STATE_FILE})"}[record["weights"]]
    return "\n".join([
        *front, "", f"# {record['model_name']} with a LoRA adapter, exported by inca", "",
        f"Base model: timm's `{record['model_name']}` with {weights}, model kwargs "
        f"`{json.dumps(record['model_kwargs'])}`, weights hash `{record['weights_hash']}`, a new head "
        f"`reset_classifier(**{json.dumps(record['reset_classifier'])})`.",
        "", "Load it with `inca.load_peft_export(DIR)`, which also checks the weights' hash, or with timm, "
        "safetensors and PEFT alone (`DIR`: this directory):", "", "```python", LOAD_RECIPE + "```", "",
    ])  # fmt: skip


def load_peft_export(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model :func:`export_peft` exported with its backbone: the exact base model (its weights' hash checked
    against the record), the head it was trained with, and the adapter through ``peft.PeftModel``, in eval mode."""
    directory = Path(directory)
    record = _read_record(directory)
    state_file = record["state_file"]
    weights = str(directory / state_file) if state_file else "pretrained"
    backbone = create_backbone(record["model_name"], weights, record["model_kwargs"], device)
    if backbone.weights_hash != record["weights_hash"]:
        raise InCAError(
            f"the base model rebuilt for {directory} has weights hash {backbone.weights_hash}, the export records "
            f"{record['weights_hash']}: {'the hub weights changed' if not state_file else f'{state_file} changed'}"
        )
    try:
        from peft import PeftModel
    except ImportError:
        raise InCAError("loading a PEFT export needs peft: pip install peft") from None
    model = backbone.model
    model.reset_classifier(**record["reset_classifier"])
    return PeftModel.from_pretrained(model.to(device), str(directory)).eval()


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / BASE_RECORD_FILE
    if not (directory / PEFT_CONFIG_FILE).is_file():
        raise InCAError(f"{directory} is not a PEFT adapter directory: it has no {PEFT_CONFIG_FILE}")
    if not path.is_file():
        raise InCAError(f"{directory} has no {BASE_RECORD_FILE}: it was exported without its backbone, so build "
                        "the base model yourself and use peft.PeftModel.from_pretrained")
    record = read_json_file(path, "export the model again")
    keys = ("model_name", "model_kwargs", "weights_hash", "state_file", "reset_classifier")
    if not isinstance(record, dict) or any(key not in record for key in keys):
        raise InCAError(f"{path} lacks some of {', '.join(keys)}; export the model again")
    if record["state_file"] and not (directory / record["state_file"]).is_file():
        raise InCAError(f"{directory} lacks {record['state_file']}, the base model's weights; copy the whole "
                        "export directory")
    return record
