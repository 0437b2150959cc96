"""A frozen timm Vision Transformer: weights, preprocessing and intermediate-token extraction.

Everything downstream (cache, adapters, probes) sees the backbone only through :class:`Backbone`:
``extract(images, layers)`` returns each requested block's tokens ``[B, T, D]`` with the prefix
(CLS / register) tokens first, exactly as timm's ``forward_intermediates`` computes them.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import yaml
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from timm.data import create_transform, resolve_data_config
from timm.layers import to_2tuple
from torch import nn

from .devices import autocast
from .errors import InCAError, first_line
from .io import FINGERPRINT_LENGTH, digest
from .registry import unknown_name

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
# The seed of --weights random: inca's own choice (any fixed value would do). Random weights are then a fixed
# function of the name and model kwargs, so their fingerprint, stores and results are reproducible across runs.
RANDOM_INIT_SEED = 0
# How long reaching the hub may take before a missing download is reported as unreachable: inca's own choice, a
# reachable host accepts a TCP connection well within it, and an offline machine hears so in seconds rather than
# after huggingface_hub's minute of retries.
HUB_CONNECT_SECONDS = 5


def parse_model_kwargs(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Parse timm-style ``k=v`` pairs (``img_size=32 patch_size=8``); values are YAML scalars or lists."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InCAError(f"--model-kwargs expects key=value pairs, got {item!r} (e.g. img_size=32)")
        kwargs[key.strip()] = yaml.safe_load(value)
    return kwargs


def resolve_layers(spec: str | int | list[int], num_blocks: int) -> list[int]:
    """Turn a layer spec into sorted, unique, non-negative block indices.

    Specs: ``all``, ``-1``, ``0,5,11``, ``last:4`` (the last four blocks); negative indices count from the
    end as in Python. Out-of-range indices are an error that names the valid range.
    """
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, (list, tuple)):
        items = [int(i) for i in spec]
    else:
        text = str(spec).strip().lower()
        if text == "all":
            return list(range(num_blocks))
        if text.startswith("last:"):
            count = _parse_int(text[5:], spec)
            if not 1 <= count <= num_blocks:
                raise InCAError(
                    f"layer spec {spec!r}: the backbone has {num_blocks} blocks, use last:1..last:{num_blocks}"
                )
            return list(range(num_blocks - count, num_blocks))
        items = [_parse_int(part, spec) for part in text.split(",") if part.strip()]
        if not items:
            raise InCAError(f"layer spec {spec!r} is empty: use all, -1, 0,5,11 or last:K")
    out = set()
    for index in items:
        if not -num_blocks <= index < num_blocks:
            raise InCAError(
                f"layer {index} is out of range: the backbone has {num_blocks} blocks, "
                f"valid indices are 0..{num_blocks - 1} (or -{num_blocks}..-1)"
            )
        out.add(index % num_blocks)
    return sorted(out)


def _parse_int(text: str, spec: Any) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise InCAError(f"layer spec {spec!r} is not valid: use all, -1, 0,5,11 or last:K") from None


def returns_prefix_tokens(model: nn.Module) -> bool:
    """Whether ``model``'s intermediates carry prefix tokens: CaiT and XCiT add their class token only after
    the token blocks, and SAM's ViT has none, so their intermediates are patch tokens alone."""
    return int(getattr(model, "num_prefix_tokens", 0) or 0) > 0 and (
        "return_prefix_tokens" in inspect.signature(model.forward_intermediates).parameters
    )


def intermediate_tokens(model: nn.Module, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """Output tokens ``[B, T, D]`` of each block in ``layers`` (ascending, non-negative), prefix tokens
    (CLS, registers) first, from one timm ``forward_intermediates`` pass that stops after the last of them.
    Asked for as a patch grid (the one layout every timm ViT, SAM's included, returns) and flattened
    row-major, which is timm's token order. Plain tensor code, no hooks: traceable by ``torch.compile``
    and ``torch.export``."""
    prefix = {"return_prefix_tokens": True} if returns_prefix_tokens(model) else {}
    outputs = model.forward_intermediates(
        images, indices=list(layers), output_fmt="NCHW", intermediates_only=True, stop_early=True, **prefix
    )
    tokens = []
    for out in outputs:
        grid, extra = out if isinstance(out, tuple) else (out, None)
        patches = grid.flatten(2).transpose(1, 2)
        tokens.append(patches if extra is None else torch.cat([extra, patches], dim=1))
    return tokens


def block_tokens(model: nn.Module, images: torch.Tensor, layers: list[int],
                 final_norm: bool = False) -> dict[int, torch.Tensor]:
    """:func:`intermediate_tokens` by block index; with ``final_norm`` the last block's tokens go through the
    model's final norm, as its own head reads them. One definition for extraction and for serving, so adapters
    are served the tokens they were trained on."""
    tokens = dict(zip(layers, intermediate_tokens(model, images, layers), strict=True)) if layers else {}
    last = len(model.blocks) - 1
    if final_norm and last in tokens:
        tokens[last] = model.norm(tokens[last])
    return tokens


@dataclass
class Backbone:
    """A frozen timm ViT with the preprocessing of the model actually built."""

    model: nn.Module
    name: str
    weights: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    weights_hash: str = ""
    final_norm: bool = False  # the model's final norm on the last block's tokens (DINO's linear evaluation)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def width(self) -> int:
        return int(self.model.embed_dim)

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens in front of the patch tokens that :meth:`extract` returns."""
        return int(self.model.num_prefix_tokens) if returns_prefix_tokens(self.model) else 0

    @property
    def grid_size(self) -> tuple[int, int]:
        return patch_grid(self.model)

    @property
    def num_tokens(self) -> int:
        height, width = self.grid_size
        return self.num_prefix_tokens + height * width

    @property
    def token_layout(self) -> dict[str, Any]:
        """Where each kind of token sits in ``[prefix..., patches...]``; recorded in cache manifests."""
        prefix = self.num_prefix_tokens
        num_cls = 1 if prefix and getattr(self.model, "cls_token", None) is not None else 0
        num_dist = 1 if prefix and getattr(self.model, "dist_token", None) is not None else 0  # DeiT's, after CLS
        return {
            "num_prefix_tokens": prefix,
            "cls_token": num_cls == 1,
            **({"distillation_token": True} if num_dist else {}),
            "num_register_tokens": prefix - num_cls - num_dist,
            "grid_size": list(self.grid_size),
            "num_tokens": self.num_tokens,
        }

    @property
    def transform(self):
        return create_transform(**self.data_config, is_training=False)

    @property
    def train_transform(self):
        """timm's training augmentation for this model's input (random resized crop, flip, colour jitter)."""
        return create_transform(**self.data_config, is_training=True)

    @property
    def fingerprint(self) -> str:
        """Identifies everything that determines the activations: architecture, weights, preprocessing
        (and the final norm, only when it is on, so fingerprints without it never change)."""
        return digest(
            {
                "name": self.name,
                "model_kwargs": self.model_kwargs,
                "weights_hash": self.weights_hash,
                "preprocessing": self.preprocessing,
                **({"final_norm": True} if self.final_norm else {}),
            }
        )

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self.data_config.items())}

    def describe(self) -> dict[str, Any]:
        """What a manifest or report records about the backbone."""
        return {
            "name": self.name,
            "weights": self.weights,
            "weights_hash": self.weights_hash,
            "model_kwargs": self.model_kwargs,
            "preprocessing": self.preprocessing,
            "num_blocks": self.num_blocks,
            "width": self.width,
            "num_heads": self.num_heads,
            "token_layout": self.token_layout,
            **({"final_norm": True} if self.final_norm else {}),
            "fingerprint": self.fingerprint,
        }

    def to(self, device: str | torch.device) -> Backbone:
        self.model.to(device)
        return self

    def extract(self, images: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """Each requested block's output tokens ``[B, T, D]``, prefix tokens first; one forward pass.

        Keys are non-negative block indices (``-1`` comes back as ``num_blocks - 1``). With ``final_norm`` the
        last block's tokens go through the model's final norm, as its own head reads them.
        """
        layers = resolve_layers(list(layers), self.num_blocks)
        images = images.to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.device):
            return block_tokens(self.model, images, layers, self.final_norm)


def create_backbone(
    name: str,
    weights: str = "pretrained",
    model_kwargs: list[str] | dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    final_norm: bool = False,
) -> Backbone:
    """Build a frozen timm ViT. ``weights`` is ``pretrained``, ``random`` or a local weights file.

    ``final_norm``: :meth:`Backbone.extract` applies the model's final norm to the last block's tokens (what
    DINO's linear evaluation reads); intermediate blocks are never normed."""
    kwargs = parse_model_kwargs(model_kwargs)
    _check_model_name(name)
    model = _create_model(name, weights, kwargs)
    _check_token_model(model, name)
    model.eval().requires_grad_(False)
    data_config = resolve_data_config(model=model)
    data_config["input_size"] = (3, *(int(s) for s in to_2tuple(model.patch_embed.img_size)))
    backbone = Backbone(
        model=model,
        name=name,
        weights=weights if weights in ("pretrained", "random") else str(Path(weights).resolve()),
        model_kwargs=kwargs,
        data_config=data_config,
        weights_hash=state_dict_hash(model),
        final_norm=final_norm,
    )
    logger.info(
        "backbone %s (%s weights): %d blocks, width %d, %d tokens, input %s",
        name, weights, backbone.num_blocks, backbone.width, backbone.num_tokens, data_config["input_size"],
    )
    return backbone.to(device)


def state_dict_hash(model: nn.Module) -> str:
    """A content hash of the weights, so caches built from other weights are never reused."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def _check_token_model(model: nn.Module, name: str) -> None:
    """The backbone must be a column of same-width token blocks over a fixed patch grid: what the adapters,
    the store's fixed ``[T, D]`` rows and the probes assume."""
    if not all(hasattr(model, attr) for attr in ("forward_intermediates", "blocks", "embed_dim")):
        raise InCAError(
            f"backbone {name!r} is not a ViT-family transformer (no column of token blocks; hierarchical models "
            "such as Swin or MViT change width by stage); choose a timm ViT such as vit_base_patch16_224, "
            "deit_small_patch16_224 or eva02_base_patch14_224"
        )
    if len(model.blocks) == 0:
        raise InCAError(f"backbone {name!r} was built with no blocks (--model-kwargs depth=0?): adapters read the "
                        "tokens of its blocks, so give it depth >= 1")
    if patch_grid(model) is None:
        raise InCAError(f"backbone {name!r} has no fixed input size and patch grid (a variable-resolution ViT such "
                        "as NaFlexViT), so its token count varies by image; choose a fixed-resolution ViT")


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """The patch grid of the model's fixed input size (``patch_embed.grid_size``, or image size over patch
    size where the embedding does not record it, as XCiT's); None for variable-resolution models."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "img_size", None) is None:
        return None
    if getattr(embed, "grid_size", None) is not None:
        return tuple(int(s) for s in embed.grid_size)
    patch = to_2tuple(embed.patch_size)
    return tuple(int(i) // int(p) for i, p in zip(to_2tuple(embed.img_size), patch))


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    raise unknown_name("backbone", name.split(".")[0], timm.list_models(), wording=f"unknown backbone {name!r}",
                       options="see timm.list_models('vit*')", matches=4)


def _create_model(name: str, weights: str, kwargs: dict[str, Any]) -> nn.Module:
    kwargs = {"num_classes": 0, **kwargs}
    try:
        if weights == "pretrained":
            return _create_pretrained(name, kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # random weights are a fixed function of the name and kwargs
            model = timm.create_model(name, pretrained=False, **kwargs)
    except InCAError:
        raise
    except Exception as exc:  # timm raises many kinds for impossible kwargs (ZeroDivisionError, AssertionError, ...)
        given = {k: v for k, v in kwargs.items() if k != "num_classes"}
        raise InCAError(
            f"backbone {name!r} cannot be built with --model-kwargs {given}: {first_line(exc)}; "
            "check the values (e.g. positive sizes, embed_dim divisible by num_heads)"
        ) from None
    if weights != "random":
        _load_weights_file(model, name, weights)
    return model


HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
HUB_HINT = (
    "fill the Hugging Face cache on a connected machine (python -c \"import timm; timm.create_model('{name}', "
    "pretrained=True)\") and copy HF_HOME over, set HF_HUB_OFFLINE=1 to never try the network, or use "
    "--weights random or --weights PATH"
)


def _create_pretrained(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm's pretrained weights: from the local Hugging Face cache when they are there (no network at all),
    else downloaded after one quick reachability check, so an offline machine fails in seconds with a fix
    rather than after a minute of retries."""
    if not timm.is_model_pretrained(name) and not any(
        timm.is_model_pretrained(tagged) for tagged in timm.list_pretrained(name + ".*")
    ):
        raise InCAError(f"timm has no pretrained weights for {name!r}: use --weights random or --weights PATH")
    cached = _cached_hub_weights(name)
    if cached is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    if hf_constants.is_offline_mode():
        raise InCAError(f"pretrained weights for {name!r} are not in the local cache and HF_HUB_OFFLINE is set: "
                        + HUB_HINT.format(name=name))
    host = urlparse(hf_constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_CONNECT_SECONDS).close()
    except OSError as exc:
        raise InCAError(f"pretrained weights for {name!r} are not in the local cache and {host} cannot be reached "
                        f"({first_line(exc)}): " + HUB_HINT.format(name=name)) from None
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # network and hub errors of many kinds
        raise InCAError(f"pretrained weights for {name!r} could not be fetched ({first_line(exc)}): "
                        + HUB_HINT.format(name=name)) from None


def _cached_hub_weights(name: str) -> str | None:
    """The local path of ``name``'s hub weights when the Hugging Face cache already holds them."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else HUB_WEIGHT_FILES
    for filename in files:
        path = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _load_weights_file(model: nn.Module, name: str, path: str) -> None:
    """Load a local checkpoint without executing pickles (safetensors or ``weights_only`` torch.load)."""
    file = Path(path)
    if file.suffix.lower() not in WEIGHT_SUFFIXES:
        raise InCAError(
            f"--weights {path!r} is neither pretrained, random nor a weights file "
            f"({', '.join(WEIGHT_SUFFIXES)})"
        )
    if not file.is_file():
        raise InCAError(f"weights file {path!r} does not exist")
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    try:
        result = timm.models.load_checkpoint(
            model, os.fspath(file), strict=False, filter_fn=filter_fn, weights_only=True
        )
    except Exception as exc:
        raise InCAError(f"cannot load weights {path!r} into {name!r}: {first_line(exc, 200)}") from None
    if result is not None:
        missing = [k for k in result.missing_keys if not k.startswith("head")]
        unexpected = [k for k in result.unexpected_keys if not k.startswith("head")]
        if missing or unexpected:
            raise InCAError(
                f"weights {path!r} do not fit {name!r} with these --model-kwargs: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
