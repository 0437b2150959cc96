"""LoRA on timm ViTs: ``y = W x + b + s * B A dropout(x)`` with frozen W, b (Hu et al., 2021).

Naming follows PEFT (``lora_A`` [r, in], Kaiming-uniform; ``lora_B`` [out, r], zeros; ``s = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA) but :class:`LoRALinear` *is* the ``nn.Linear`` it replaces, keeping
``weight``/``bias`` in place: the backbone's state-dict names do not change, so backbone checkpoints load into
an adapted model as they are. Layers are chosen by ``re.fullmatch`` on module names (see
:func:`inca.adapters.common.select_linear_modules`).

Saved adapters hold only ``lora_A``/``lora_B``, the head, and for layers whose base weight was shifted by an
initialisation such as LoRA-GA (:meth:`LoRALinear.shift_base`) the ``lora_A0``/``lora_B0`` that shifted it, so
:func:`load_lora` on the original backbone rebuilds the trained model exactly.
:func:`inca.adapters.peft_export.export_peft` writes the same model as a PEFT adapter directory.
"""

from __future__ import annotations

import logging
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from inca.adapters.common import (
    backbone_parameter_count,
    count_parameters,
    describe_trainable,
    head_parameters,
    load_tensors,
    named_tensors,
    read_adapter,
    select_linear_modules,
    set_trainable,
    write_adapter,
)
from inca.errors import InCAError
from inca.options import DEFAULT_TARGET

__all__ = [
    "DEFAULT_TARGET",
    "LoRALinear",
    "apply_lora",
    "load_lora",
    "lora_layers",
    "mark_lora_trainable",
    "merge_lora",
    "save_lora",
    "unmerge_lora",
]

logger = logging.getLogger(__name__)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (sharing the original's frozen ``weight`` and ``bias``) plus a rank-r update."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0
    ) -> None:
        # Built on "meta" so no throw-away weight is allocated; the real tensors are the base layer's own.
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device="meta",
            dtype=base.weight.dtype,
        )
        self.weight = base.weight
        self.bias = base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT / microsoft/LoRA
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = dropout
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        x_in = F.dropout(x, self.dropout, self.training) if self.dropout else x
        h = F.linear(x_in, self.lora_A)
        # One addmm adds s * h B^T onto the base output, where PEFT's B(h), "* s" and "+" each make an [N, out]
        # tensor (and backward pass); tools/bench_lora.py measures the difference.
        out2d = torch.addmm(
            out.reshape(-1, self.out_features), h.reshape(-1, self.rank), self.lora_B.t(), alpha=self.scaling
        )
        return out2d.view(out.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s * B A`` into ``weight`` (computed in fp32) so inference costs one plain GEMM."""
        if not self.merged:
            self._add_to_weight(self.lora_B, self.lora_A, self.scaling)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(self.lora_B, self.lora_A, -self.scaling)
            self.merged = False

    @torch.no_grad()
    def shift_base(self, lora_A0: torch.Tensor, lora_B0: torch.Tensor) -> None:
        """``W <- W - s * (B0 @ A0)`` in fp32 and remember ``A0``, ``B0`` (persistent buffers).

        Used by initialisations that start from a non-zero ``B A`` yet must keep the model's output
        (LoRA-GA). The same inputs through this same function give a bitwise-identical weight (on the same
        device and library), which is how :func:`load_lora` reproduces a trained model from the original
        backbone without storing the full weight.
        """
        if self.merged:
            raise InCAError("cannot shift the base weight of a merged LoRA layer; unmerge_lora(model) first")
        if self.shifted:
            raise InCAError("this LoRA layer's base weight is already shifted; start from a fresh backbone")
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.register_buffer("lora_A0", lora_A0.detach().to(**factory, copy=True))
        self.register_buffer("lora_B0", lora_B0.detach().to(**factory, copy=True))
        self._add_to_weight(self.lora_B0, self.lora_A0, -self.scaling)

    @property
    def shifted(self) -> bool:
        """Whether :meth:`shift_base` has moved the base weight away from the backbone's."""
        return "lora_A0" in self._buffers

    def _add_to_weight(self, B: torch.Tensor, A: torch.Tensor, scale: float) -> None:
        delta = (B.float() @ A.float()) * scale
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All :class:`LoRALinear` modules of ``model`` by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16,
    target: str = DEFAULT_TARGET,
    rslora: bool = False,
    dropout: float = 0.0,
) -> list[str]:
    """Replace every ``nn.Linear`` whose name fullmatches ``target`` by a :class:`LoRALinear`.

    Afterwards only the LoRA parameters and the classification head require grad (:func:`mark_lora_trainable`).
    Returns the wrapped module names. Nothing is modified when an argument or the regex is bad.
    """
    if not isinstance(rank, int) or rank < 1:
        raise InCAError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise InCAError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    matched = select_linear_modules(model, target)
    for name, m in matched:
        if isinstance(m, LoRALinear):
            raise InCAError(f"{name!r} already has LoRA; apply_lora once, on a fresh backbone")
        if rank > min(m.in_features, m.out_features):
            raise InCAError(
                f"LoRA rank {rank} exceeds the smaller side of {name!r} ({m.out_features}x{m.in_features}); "
                f"use rank <= {min(m.in_features, m.out_features)}"
            )
    backbone = backbone_parameter_count(model)
    for name, m in matched:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(m, rank, alpha, rslora, dropout))
    mark_lora_trainable(model)
    logger.info("LoRA r=%d on %d layers: %s", rank, len(matched),
                describe_trainable(count_parameters(model).trainable, backbone))
    return [name for name, _ in matched]


def _lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def mark_lora_trainable(model: nn.Module, train_head: bool = True) -> None:
    """Only LoRA parameters (and the classification head when ``train_head``) require grad."""
    params = _lora_parameters(model)
    if not params:
        raise InCAError("the model has no LoRA layers; call apply_lora(model) first")
    set_trainable(model, params + (head_parameters(model) if train_head else []))


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight; the forward then skips the LoRA branch."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora` (up to fp32 rounding of the base weight)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def save_lora(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save LoRA weights, base shifts (``lora_A0``/``lora_B0``, if any) and the head; never the backbone."""
    layers = lora_layers(model)
    if not layers:
        raise InCAError("the model has no LoRA layers to save; call apply_lora(model) first")
    first = next(iter(layers.values()))
    config = {
        "method": "lora",
        "rank": first.rank,
        "alpha": first.alpha,
        # The regex that selects exactly the wrapped layers, whatever pattern first chose them.
        "target": "|".join(map(re.escape, layers)),
        "rslora": first.rslora,
        "dropout": first.dropout,
        "wrapped": list(layers),
    }
    shifts = [t for layer in layers.values() for t in layer.buffers(recurse=False)]
    tensors = named_tensors(model, _lora_parameters(model) + head_parameters(model) + shifts)
    write_adapter(directory, config, tensors)


def load_lora(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Apply the saved LoRA to a fresh ``model`` (the backbone it was trained on) and load its weights.

    Re-applies any saved base shift with :meth:`LoRALinear.shift_base` before loading ``lora_A``/``lora_B``,
    so a LoRA-GA model is reproduced exactly. Returns the wrapped module names.
    """
    config, tensors = read_adapter(directory, "lora")
    names = apply_lora(model, config["rank"], config["alpha"], config["target"], config["rslora"],
                       config["dropout"])
    if names != config["wrapped"]:
        raise InCAError(
            f"the saved LoRA wraps {len(config['wrapped'])} layers but this backbone yields {len(names)} for "
            f"target {config['target']!r}; load onto the architecture it was saved from"
        )
    layers = lora_layers(model)
    for name, layer in layers.items():
        a0, b0 = tensors.pop(f"{name}.lora_A0", None), tensors.pop(f"{name}.lora_B0", None)
        if (a0 is None) != (b0 is None):
            raise InCAError(f"saved adapter has only one of {name}.lora_A0 / lora_B0; save it again")
        if a0 is not None:
            layer.shift_base(a0, b0)
    expected = named_tensors(model, _lora_parameters(model) + head_parameters(model))
    load_tensors(model, tensors, expected)
    return names
