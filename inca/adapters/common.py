"""Plumbing shared by the methods' adapters (LoRA, LoRA-GA, Compacter, full fine-tuning, linear probe).

One regex semantic for choosing layers, one way to say which parameters train, one parameter count, and
one small on-disk adapter format (``adapter.safetensors`` + ``adapter_config.json``, see :func:`write_adapter`)
so every method saves only what it trained and refuses to load onto something it was not made for.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from inca.errors import InCAError, first_line
from inca.io import atomic_write, atomic_write_json, file_sha256, read_json_file
from inca.outputs import ADAPTER_CONFIG as CONFIG_FILE

WEIGHTS_FILE = "adapter.safetensors"
# 2: the weights file's header carries the config they were saved with (1: it did not; still read).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
SIGNED_CONFIG_KEY = "inca.config"
MAX_CONFIG_BYTES = 16 << 20  # inca's own bound: configs are a few KiB; refuse a huge file before parsing it
_UNSIGNED = ("format_version", "weights_sha256")  # recorded by write_adapter about the files themselves

logger = logging.getLogger(__name__)


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


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts; a parameter shared by several modules counts once."""
    params = list(model.parameters())  # deduplicated by identity
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def backbone_parameter_count(model: nn.Module) -> int:
    """Parameters of a backbone copy without its classification head: :func:`trainable_percent`'s denominator
    (count them before a method adds its own parameters)."""
    head = {id(p) for p in head_parameters(model)}
    return sum(p.numel() for p in model.parameters() if id(p) not in head)


def trainable_percent(trainable: int, backbone_params: int) -> float:
    """The one trainable share inca logs and tables: the trainable parameters (a method's own and the head's) as a
    percentage of the frozen backbone's (the ViT without a head), so every method is divided by the same number.
    (Dividing by the adapted model's total instead, which grows with the method's parameters, gives a smaller
    figure: 5.16% where this is 5.44%.)"""
    return 100.0 * trainable / backbone_params


def percent_text(percent: float) -> str:
    """A trainable share as logs and tables print it."""
    return f"{percent:.2f}%"


def describe_trainable(trainable: int, backbone_params: int) -> str:
    """``"N trainable parameters (P% of the backbone's M)"``, the one wording of every log line."""
    share = percent_text(trainable_percent(trainable, backbone_params))
    return f"{trainable:,} trainable parameters ({share} of the backbone's {backbone_params:,})"


def named_tensors(model: nn.Module, params: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for the given parameters/buffers of ``model`` (first name of a shared one)."""
    wanted = {id(p) for p in params}
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {name: t for name, t in named if id(t) in wanted}


def write_adapter(
    directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Write ``tensors`` (safetensors) then ``config`` (JSON), each atomically.

    The weights file carries, in its header metadata (:data:`SIGNED_CONFIG_KEY`), the config they were
    saved with, and the config records the weights file's SHA-256, written last. So a crash between the two
    files or a weights file from another save is detected on load, and so is a hand edit of the config (two
    class names swapped, a layer changed) that would give the same weights another meaning. Inside
    :func:`config_additions` for ``directory``, ``config`` gains its keys before it is signed.
    """
    directory = Path(directory)
    config = _with_additions(directory, config)
    clash = sorted(set(config) & set(_UNSIGNED))
    if clash:
        raise InCAError(f"an adapter config may not set {clash}: write_adapter records them")
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    header = {"format": "pt", SIGNED_CONFIG_KEY: _canonical(config)}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(cpu, tmp, metadata=header))
    full = {**config, "format_version": FORMAT_VERSION, "weights_sha256": file_sha256(directory / WEIGHTS_FILE)}
    atomic_write_json(directory / CONFIG_FILE, full)


def read_adapter(
    directory: str | os.PathLike, method: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and CPU tensors of an adapter written by :func:`write_adapter` for ``method`` (None: any); a config
    edited since (see :func:`resign_adapter`) is refused, naming what changed."""
    config, tensors, signed = _read_files(directory, method)
    if signed is None:  # saved before configs were signed: still loads, as it always did
        logger.warning("%s was saved by an older inca that did not sign its %s, so an edit to it cannot be "
                       "detected; `inca-predict --resign %s` signs it as it is now", directory, CONFIG_FILE, directory)
    else:
        changed = config_changes(signed, _signed_part(config))
        if changed:
            raise InCAError(
                f"{Path(directory, CONFIG_FILE)} was edited after it was saved with its weights "
                f"({_summary(changed)}); restore it, or if the weights really mean this, accept it with "
                f"`inca-predict --resign {directory}`"
            )
    return config, tensors


def resign_adapter(
    directory: str | os.PathLike, check: Callable[[dict[str, Any], dict[str, torch.Tensor]], None] | None = None
) -> list[str]:
    """Accept a deliberate edit of ``adapter_config.json``: sign the config as it is now (after ``check(config,
    tensors)`` raises nothing), leaving the weights unchanged. Returns what changed since the last signature
    (empty if nothing did; an adapter saved before signatures existed gets its first one).

    The weights must still be the ones the config recorded: a damaged weights file is not re-signed.
    """
    config, tensors, signed = _read_files(directory, None)
    if check is not None:
        check(config, tensors)
    fresh = _signed_part(config)
    changed = ["first signature"] if signed is None else config_changes(signed, fresh)
    if changed:
        write_adapter(directory, fresh, tensors)
    return changed


@dataclass
class _Additions:
    directory: Path
    keys: dict[str, Any]
    written: bool = False


_ADDITIONS: ContextVar[_Additions | None] = ContextVar("inca_adapter_config_additions", default=None)


@contextmanager
def config_additions(directory: str | os.PathLike, additions: Mapping[str, Any]) -> Iterator[None]:
    """Inside this block, :func:`write_adapter` adds ``additions`` to the config it signs for ``directory``: keys a
    method's ``save(model, directory)`` does not know, such as the provenance a saved model is served by. They
    go into the one save, so the weights are written once (re-signing afterwards would write them again) and no
    config is ever signed without them. A key the method's config sets already is refused rather than replaced,
    and so is a ``save`` that wrote nothing through :func:`write_adapter` there."""
    pending = _Additions(Path(directory).resolve(), dict(additions))
    token = _ADDITIONS.set(pending)
    try:
        yield
    finally:
        _ADDITIONS.reset(token)
    if not pending.written:
        raise InCAError(f"nothing was saved to {directory} through inca.adapters.common.write_adapter, so "
                        f"{sorted(pending.keys)} could not be recorded; a method's save must write its adapter with it")


def _with_additions(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the keys of the enclosing :func:`config_additions` for ``directory``, if any."""
    pending = _ADDITIONS.get()
    if pending is None or directory.resolve() != pending.directory:
        return config
    clash = sorted(set(config) & set(pending.keys))
    if clash:
        raise InCAError(f"{directory}: the method's adapter config sets {clash}, which saving it for serving "
                        "records; rename them in the method's save")
    pending.written = True
    return {**config, **pending.keys}


def config_changes(before: Any, after: Any, name: str = "") -> list[str]:
    """What differs between two configs, one entry per changed field (``members[0].num_heads: 3 -> 4``)."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for key in sorted(set(before) | set(after), key=str)
                for change in config_changes(before.get(key, _ABSENT), after.get(key, _ABSENT),
                                             f"{name}.{key}" if name else str(key))]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [change for k, (b, a) in enumerate(zip(before, after))
                for change in config_changes(b, a, f"{name}[{k}]")]
    return [] if before == after else [f"{name}: {_short(before)} -> {_short(after)}"]


_ABSENT = object()


def _summary(changes: list[str], shown: int = 4) -> str:
    more = f"; and {len(changes) - shown} more" if len(changes) > shown else ""
    return "; ".join(changes[:shown]) + more


def _short(value: Any, limit: int = 60) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _signed_part(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _UNSIGNED}


def _read_files(
    directory: str | os.PathLike, method: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """Config, CPU tensors and the signed config copy (None for an adapter of format 1) of a saved adapter,
    checked as a pair (method, format, the weights' checksum) but not against its signature."""
    config = read_config(directory)
    config_path, weights_path = Path(directory) / CONFIG_FILE, Path(directory) / WEIGHTS_FILE
    if method is not None and config.get("method") != method:
        raise InCAError(f"{directory} holds a {config.get('method')!r} adapter, not {method!r}; load it with "
                        f"the matching loader")
    if config.get("format_version") not in READABLE_FORMATS:
        raise InCAError(f"{directory} has adapter format {config.get('format_version')}, this inca reads "
                        f"{', '.join(map(str, READABLE_FORMATS))}; re-save it with a matching inca version")
    try:
        if file_sha256(weights_path) != config.get("weights_sha256"):
            raise InCAError(
                f"{weights_path} does not match {config_path} (damaged, partial or mixed save); save again"
            )
        with safe_open(str(weights_path), framework="pt") as weights:
            header = weights.metadata() or {}
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 (not a dict)
        signed = json.loads(header[SIGNED_CONFIG_KEY]) if SIGNED_CONFIG_KEY in header else None
    except InCAError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InCAError(f"{weights_path} is not a readable safetensors file ({first_line(exc)}); save again") from None
    if signed is None and config["format_version"] >= 2:
        raise InCAError(f"{weights_path} lacks the signed copy of its config that format "
                        f"{config['format_version']} adapters carry (replaced by hand?); save the adapter again")
    return config, tensors, signed


_READ: ContextVar[dict[Path, dict[str, Any]] | None] = ContextVar("inca_adapter_configs_read", default=None)


@contextmanager
def configs_read_once() -> Iterator[None]:
    """Inside this block each saved adapter's config is read from disk once: choosing its loader, checking its
    provenance and loading it (a method's ``load(model, directory)``, which takes a directory) share that read.
    A block inside another shares the outer one's reads."""
    if _READ.get() is not None:
        yield
        return
    token = _READ.set({})
    try:
        yield
    finally:
        _READ.reset(token)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """A saved adapter's config as its file says, before its weights or signature are checked (which
    :func:`read_adapter` does): enough to choose the loader of the method it names. Inside
    :func:`configs_read_once`, a config read already is not read again."""
    directory = Path(directory)
    read, key = _READ.get(), directory.resolve()
    if read is not None and key in read:
        return copy.deepcopy(read[key])  # a caller's edit must not reach the next reader
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise InCAError(f"{directory} is not a saved adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE} (files)")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise InCAError(f"{config_path} is larger than an adapter config can be ({MAX_CONFIG_BYTES} bytes); save again")
    config = read_json_file(config_path, "save the adapter again")
    if not isinstance(config, dict):
        raise InCAError(f"{config_path} is not an adapter config (a JSON object); save the adapter again")
    if read is not None:
        read[key] = copy.deepcopy(config)
    return config


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
