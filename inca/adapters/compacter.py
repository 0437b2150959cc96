"""Compacter and Compacter++ (Mahabadi et al., NeurIPS 2021) on timm ViT blocks.

A bottleneck adapter ``h + up(GELU(down(h)))`` is applied to a sub-layer's output before the block's
residual (timm pre-LN: ``x + drop_path(ls(adapter(mlp(norm2(x)))))``) by wrapping ``block.attn`` and
``block.mlp`` (Compacter) or ``block.mlp`` only (Compacter++). ``down`` and ``up`` are LPHM layers whose
weight, in ``nn.Linear``'s ``[out, in]`` layout, is the paper's

    W = sum_{i=1..n} A_i (x) B_i,    B_i = s_i t_i^T,   s_i [out/n, r],  t_i [in/n, r]

with the ``n x n x n`` rule tensor ``A`` one parameter shared by every LPHM layer of the model. (The authors'
code builds the transposed ``[in, out]`` matrix ``sum_i A_i (x) W_i`` and computes ``x @ W``, i.e. uses
``A_i^T`` in this layout; with a learned, randomly initialised ``A`` the two are the same family.)

As in the reference (rabeehk/compacter, seq2seq/configs/compacter.json): the non-linearity is the
tanh-approximated GELU (``non_linearity: gelu_new``); ``A ~ N(0, std=1e-4)`` (``phm_c_init: normal``,
``phm_init_range: 0.0001``); ``s_i``, ``t_i`` Glorot-uniform per ``i`` with gain sqrt(2) (``glorot-uniform``,
whose ``glorot_uniform`` in the authors' seq2seq/hypercomplex/inits.py is ``xavier_uniform_(gain=sqrt(2))``;
AdapterHub's PHM layer does the same); biases 0, so the adapted model starts within ~1e-4 of the backbone.
The bottleneck is ``width // reduction``, rounded up to a multiple of ``n`` when it is not one (logged), so
any ViT width divisible by ``n`` takes the default reduction. Trainable: adapters, the rule tensor, LayerNorms
(``train_norms``) and the head.
"""

from __future__ import annotations

import logging
import math
import os

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
    set_trainable,
    write_adapter,
)
from inca.errors import InCAError

__all__ = [
    "AdaptedSublayer",
    "CompacterAdapter",
    "LPHMLinear",
    "apply_compacter",
    "bottleneck_width",
    "load_compacter",
    "mark_compacter_trainable",
    "save_compacter",
]

logger = logging.getLogger(__name__)

RULE_INIT_STD = 1e-4
FACTOR_INIT_GAIN = math.sqrt(2)  # the authors' glorot_uniform


class LPHMLinear(nn.Module):
    """Low-rank parameterised hypercomplex multiplication layer: ``y = x W^T + b``, W a sum of Kroneckers."""

    def __init__(self, in_features: int, out_features: int, rule: nn.Parameter, rank: int = 1) -> None:
        super().__init__()
        n = rule.shape[0]
        self.in_features, self.out_features, self.phm_dim, self.rank = in_features, out_features, n, rank
        factory = {"device": rule.device, "dtype": rule.dtype}
        self.rule = rule  # the same Parameter object in every LPHM layer of the model
        self.s = nn.Parameter(torch.empty(n, out_features // n, rank, **factory))
        self.t = nn.Parameter(torch.empty(n, in_features // n, rank, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        for i in range(n):
            nn.init.xavier_uniform_(self.s[i], gain=FACTOR_INIT_GAIN)
            nn.init.xavier_uniform_(self.t[i], gain=FACTOR_INIT_GAIN)

    def phm_weight(self) -> torch.Tensor:
        """``sum_i kron(A_i, s_i t_i^T)`` as one ``[out, in]`` matrix (small: built anew each forward)."""
        blocks = self.s @ self.t.transpose(1, 2)  # B_i: [n, out/n, in/n]
        # kron(A_i, B_i)[a*P + p, b*Q + q] = A_i[a, b] * B_i[p, q]
        weight = torch.einsum("iab,ipq->apbq", self.rule, blocks)
        return weight.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.phm_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, n={self.phm_dim}, r={self.rank}"


class CompacterAdapter(nn.Module):
    """``h + up(GELU(down(h)))``, LPHM ``down`` (dim -> :func:`bottleneck_width`) and ``up`` (back to dim);
    GELU with the tanh approximation, as the reference's ``gelu_new``."""

    def __init__(self, dim: int, reduction: int, rule: nn.Parameter, rank: int = 1) -> None:
        super().__init__()
        self.reduction = reduction
        bottleneck = bottleneck_width(dim, reduction, rule.shape[0])
        self.down = LPHMLinear(dim, bottleneck, rule, rank)
        self.act = nn.GELU(approximate="tanh")
        self.up = LPHMLinear(bottleneck, dim, rule, rank)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdaptedSublayer(nn.Module):
    """``adapter(base_layer(*args, **kwargs))``; keyword arguments (``attn_mask``...) pass through."""

    def __init__(self, base_layer: nn.Module, adapter: CompacterAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.base_layer(*args, **kwargs))


def _residual_width(name: str, sublayer: nn.Module) -> int:
    """Width of the residual stream a sub-layer reads and adds its output back to: the input of its first
    ``nn.Linear`` (``attn.qkv``, ``mlp.fc1``). Not the last layer's output: CaiT's talking-heads attention
    registers its head-mixing layers after ``proj``."""
    first = next((m for m in sublayer.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise InCAError(f"{name!r} has no nn.Linear giving its width; Compacter needs timm ViT blocks")
    return first.in_features


def bottleneck_width(dim: int, reduction: int, phm_dim: int) -> int:
    """``dim // reduction``, rounded up to the next positive multiple of ``phm_dim`` (LPHM needs one)."""
    return max(1, math.ceil(dim // reduction / phm_dim)) * phm_dim


def _check_width(name: str, dim: int, phm_dim: int) -> None:
    if dim % phm_dim:
        raise InCAError(f"Compacter: {name!r} has width {dim}, not divisible by phm_dim {phm_dim}; "
                        f"use a phm_dim that divides {dim}")


def apply_compacter(
    model: nn.Module,
    phm_dim: int = 4,
    rank: int = 1,
    reduction: int = 32,
    plus: bool = False,
    train_norms: bool = True,
) -> list[str]:
    """Wrap the attention and MLP sub-layers (MLP only with ``plus``) of every block with an adapter.

    A block is any module with ``attn`` and ``mlp`` children (timm's ViT blocks). Afterwards only the
    adapters, the shared rule tensor, LayerNorms (``train_norms``) and the head require grad. Returns the
    wrapped sub-layer names. Nothing is modified when an argument is bad.
    """
    for label, value in (("phm_dim", phm_dim), ("rank", rank), ("reduction", reduction)):
        if not isinstance(value, int) or value < 1:
            raise InCAError(f"Compacter {label} must be a positive integer, got {value!r}")
    kinds = ("mlp",) if plus else ("attn", "mlp")
    sublayers = []
    for block_name, block in model.named_modules():
        if all(isinstance(getattr(block, kind, None), nn.Module) for kind in ("attn", "mlp")):
            for kind in kinds:
                name = f"{block_name}.{kind}" if block_name else kind
                sub = getattr(block, kind)
                if isinstance(sub, AdaptedSublayer):
                    raise InCAError(f"{name!r} already has a Compacter adapter; apply it once, to a fresh "
                                    f"backbone")
                dim = _residual_width(name, sub)
                _check_width(name, dim, phm_dim)
                sublayers.append((block, kind, name, dim))
    if not sublayers:
        raise InCAError(f"{type(model).__name__} has no blocks with .attn and .mlp; use a timm ViT")
    for dim in sorted({dim for *_, dim in sublayers}):
        if bottleneck_width(dim, reduction, phm_dim) != dim // reduction:
            logger.info("Compacter: bottleneck %d (width %d // reduction %d) is not a positive multiple of phm_dim "
                        "%d; rounded up to %d", dim // reduction, dim, reduction, phm_dim,
                        bottleneck_width(dim, reduction, phm_dim))
    backbone = backbone_parameter_count(model)
    reference = next(model.parameters())
    factory = {"device": reference.device, "dtype": reference.dtype}
    rule = nn.Parameter(torch.empty(phm_dim, phm_dim, phm_dim, **factory))
    nn.init.normal_(rule, mean=0.0, std=RULE_INIT_STD)
    for block, kind, _, dim in sublayers:
        adapter = CompacterAdapter(dim, reduction, rule, rank)
        setattr(block, kind, AdaptedSublayer(getattr(block, kind), adapter))
    mark_compacter_trainable(model, train_norms=train_norms)
    logger.info("Compacter%s on %d sub-layers: %s", "++" if plus else "", len(sublayers),
                describe_trainable(count_parameters(model).trainable, backbone))
    return [name for _, _, name, _ in sublayers]


def _adapted(model: nn.Module) -> dict[str, AdaptedSublayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedSublayer)}


def _adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for wrapped in _adapted(model).values() for p in wrapped.adapter.parameters()]
    if not params:
        raise InCAError("the model has no Compacter adapters; call apply_compacter(model) first")
    return params


def _norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]


def mark_compacter_trainable(model: nn.Module, train_norms: bool = True, train_head: bool = True) -> None:
    """Only adapter parameters, the shared rule, LayerNorms (``train_norms``) and the head require grad."""
    params = _adapter_parameters(model) + (_norm_parameters(model) if train_norms else [])
    set_trainable(model, params + (head_parameters(model) if train_head else []))


def _saved_parameters(model: nn.Module) -> list[nn.Parameter]:
    # LayerNorms are saved even when frozen: a few KB, and the file then never depends on train_norms.
    return _adapter_parameters(model) + _norm_parameters(model) + head_parameters(model)


def save_compacter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save adapters, the rule tensor, LayerNorms and the head; never the rest of the backbone."""
    wrapped = _adapted(model)
    if not wrapped:
        raise InCAError("the model has no Compacter adapters to save; call apply_compacter(model) first")
    adapter = next(iter(wrapped.values())).adapter
    config = {
        "method": "compacter",
        "phm_dim": adapter.down.phm_dim,
        "rank": adapter.down.rank,
        "reduction": adapter.reduction,
        "plus": not any(name.endswith("attn") for name in wrapped),
        "train_norms": any(p.requires_grad for p in _norm_parameters(model)),
        "wrapped": list(wrapped),
    }
    write_adapter(directory, config, named_tensors(model, _saved_parameters(model)))


def load_compacter(model: nn.Module, directory: str | os.PathLike, train_norms: bool | None = None) -> list[str]:
    """Apply the saved Compacter to a fresh ``model`` (the backbone it was trained on); load its weights.

    ``train_norms`` (default: as saved) says whether the LayerNorms require grad afterwards.
    """
    config, tensors = read_adapter(directory, "compacter")
    if train_norms is None:
        train_norms = config.get("train_norms", True)
    names = apply_compacter(model, config["phm_dim"], config["rank"], config["reduction"], config["plus"],
                            train_norms)
    if names != config["wrapped"]:
        raise InCAError(f"the saved Compacter wraps {len(config['wrapped'])} sub-layers but this backbone "
                        f"has {len(names)}; load onto the architecture it was saved from")
    load_tensors(model, tensors, named_tensors(model, _saved_parameters(model)))
    return names
