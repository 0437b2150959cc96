"""Plumbing shared by the methods' adapters (LoRA, LoRA-GA, Compacter, full fine-tuning, linear probe).

One regex semantic for choosing layers, one way to say which parameters train, one parameter count, and
one small on-disk adapter format (``adapter.safetensors`` + ``adapter_config.json``, see :func:`write_adapter`)
so every method saves only what it trained and refuses to load onto something it was not made for.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from inca.errors import InCAError, first_line
from inca.io import atomic_write, atomic_write_json, file_sha256, read_json

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1


def select_linear_modules(model: nn.Module, target: str) -> list[tuple[str, nn.Linear]]:
    """Modules whose full name ``re.fullmatch``-es ``target``; all of them must be ``nn.Linear``.

    Both failure modes are errors rather than silent no-ops: a regex that matches nothing would train only
    the head, and a loose suffix such as ``.*proj`` also hits ``patch_embed.proj`` (a Conv2d).
    """
    try:
        pattern = re.compile(target)
    except re.error as e:
        raise InCAError(f"target regex '{target}' is invalid ({e}); fix the pattern") from None
    matched = [(name, m) for name, m in model.named_modules() if name and pattern.fullmatch(name)]
    if not matched:
        raise InCAError(
            f"target regex '{target}' matches no module of {type(model).__name__}; it is matched with "
            f"re.fullmatch against full names such as 'blocks.0.attn.qkv'"
        )
    for name, m in matched:
        if not isinstance(m, nn.Linear):
            raise InCAError(
                f"target regex '{target}' matches {name!r}, a {type(m).__name__}, but only nn.Linear layers "
                f"can be adapted; narrow the regex (e.g. anchor it with 'blocks\\.\\d+\\.')"
            )
    return matched


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """timm's ``get_classifier()`` as a list: a distilled DeiT has two heads, whose logits it averages."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        raise InCAError(
            f"{type(model).__name__} has no get_classifier(); use a timm model or train_head=False"
        )
    heads = get_classifier()
    return list(heads) if isinstance(heads, (tuple, list)) else [heads]


def logit_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that map the pooled features (timm's ``forward_head(pre_logits=True)``) to logits: each
    classifier, or its final ``fc`` where the classifier pools first (timm's ``ClassifierHead``, as SAM's ViT)."""
    return [getattr(head, "fc", head) for head in classifier_modules(model)]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classification head (timm's ``get_classifier()``): trained by every method."""
    return [p for head in classifier_modules(model) for p in head.parameters()]


def set_trainable(model: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Exactly ``params`` require grad afterwards; everything else in ``model`` is frozen."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts; a parameter shared by several modules counts once."""
    params = list(model.parameters())  # deduplicated by identity
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def named_tensors(model: nn.Module, params: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for the given parameters/buffers of ``model`` (first name of a shared one)."""
    wanted = {id(p) for p in params}
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {name: t for name, t in named if id(t) in wanted}


def write_adapter(
    directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Write ``tensors`` (safetensors) then ``config`` (JSON), each atomically.

    The config records the weights' sha256 and is written last, so a crash between the two files, or a
    weights file from another save, is detected on load instead of silently mixing two adapters.
    """
    directory = Path(directory)
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(cpu, tmp))
    full = {**config, "format_version": FORMAT_VERSION, "weights_sha256": file_sha256(directory / WEIGHTS_FILE)}
    atomic_write_json(directory / CONFIG_FILE, full)


def read_adapter(directory: str | os.PathLike, method: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and CPU tensors of an adapter written by :func:`write_adapter` for ``method``."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise InCAError(f"{directory} is not a saved adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = read_json(config_path)
    except (OSError, ValueError) as exc:
        raise InCAError(f"{config_path} is not valid JSON ({first_line(exc)}); save the adapter again") from None
    if not isinstance(config, dict):
        raise InCAError(f"{config_path} is not an adapter config (a JSON object); save the adapter again")
    if config.get("method") != method:
        raise InCAError(f"{directory} holds a {config.get('method')!r} adapter, not {method!r}; load it with "
                        f"the matching loader")
    if config.get("format_version") != FORMAT_VERSION:
        raise InCAError(f"{directory} has adapter format {config.get('format_version')}, this inca reads "
                        f"{FORMAT_VERSION}; re-save it with a matching inca version")
    if file_sha256(weights_path) != config.get("weights_sha256"):
        raise InCAError(f"{weights_path} does not match {config_path} (damaged, partial or mixed save); save again")
    try:
        return config, load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InCAError(f"{weights_path} is not a readable safetensors file ({first_line(exc)}); save again") from None


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], expected: Collection[str]) -> None:
    """Copy ``tensors`` into the same-named parameters/buffers of ``model``; names must be ``expected``."""
    missing, extra = set(expected) - tensors.keys(), tensors.keys() - set(expected)
    if missing or extra:
        raise InCAError(
            f"saved adapter does not fit this model: missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(extra)[:3]}; load onto the same backbone architecture and num_classes it was saved from"
        )
    targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in tensors.items():
            dest = targets[name]
            if dest.shape != value.shape:
                raise InCAError(
                    f"saved {name} has shape {tuple(value.shape)} but the model's is {tuple(dest.shape)}; "
                    f"build the backbone with the same width and num_classes as when it was saved"
                )
            dest.copy_(value)
