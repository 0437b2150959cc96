"""InCA: cross-attention adapters that read one layer of a frozen ViT, and banks of them trained together.

Every adapter computes, from tokens ``z [B, T, D]`` and ``m`` learned queries ``q [m, D]``::

    h      = q + CrossAttn(LN_q(q), LN_z(z))
    h      = h + MLP(LN_mlp(h))                     only when mlp_ratio > 0
    logits = head(LN_out(h)).mean(over queries)

``CrossAttn`` is parameterised exactly like ``nn.MultiheadAttention(D, H, batch_first=True)``, and
:class:`InCAReference` runs it through that module. The adapters here never project the T tokens
through W_k and W_v ("folded attention"): the queries are learned, so per head the key projection
and LN_z's gain fold into a query vector ``u_h = (Q_h W_k,h) * gamma / sqrt(dh)`` and the scores are
``z_hat . u_h`` (z_hat: tokens standardised without affine; the key bias and LN_z's shift add a
per-query constant that cancels in softmax). The standardised tokens are pooled first and projected
after: ``O_h = (A_h z_hat * gamma + beta) W_v,h^T + b_v,h``, exact because attention rows sum to 1.
Cost per image ~2TDmH + mD^2 instead of ~2TD^2.

The math is written once, on parameters stacked along a leading adapter dimension ``E``: a single
:class:`InCA` runs it with ``E = 1``, an :class:`InCABank` with its adapters stacked.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from inca.errors import InCAError
from inca.quantize import QuantizedTokens

__all__ = [
    "AdapterSpec",
    "InCA",
    "InCABank",
    "InCAReference",
    "InCAStack",
    "OpenInCA",
    "join_qkv",
    "split_qkv",
    "standardise",
    "uses_weight_decay",
]

LN_EPS = 1e-5  # nn.LayerNorm's default, used by every LayerNorm of an adapter
# The query rows of one attention product (_attend) come in multiples of this many, zero queries padding the rest:
# CPU matrix kernels vectorise 16 float32 lanes (AVX-512) and take other code paths for narrower products and for
# vector tails, which round differently. Padded, a query's scores, pooling and gradient come out bit-identical
# whatever other queries share the products, so an adapter trains the same in any bank, however many of its
# neighbours successive halving prunes. inca's own choice; it costs at most 15 zero queries per layer.
ATTEND_ROWS = 16
_QKV = ("attn.w_q", "attn.w_k", "attn.w_v"), ("attn.b_q", "attn.b_k", "attn.b_v")
_DECAYED = frozenset(
    {"attn.in_proj_weight", *_QKV[0], "attn.out_proj.weight", "head.weight", "mlp.fc1.weight", "mlp.fc2.weight"}
)


def uses_weight_decay(name: str) -> bool:
    """Whether parameter ``name`` is weight-decayed: projection matrices only, as timm does (no norms,
    biases or queries, which play the role of a class token)."""
    return name in _DECAYED


def split_qkv(params: Mapping[str, Tensor], dim: int = 0) -> dict[str, Tensor]:
    """InCA parameters with the packed ``attn.in_proj_weight``/``bias`` split (along ``dim``) into
    ``attn.w_q``, ``attn.w_k``, ``attn.w_v``, ``attn.b_q``, ``attn.b_k``, ``attn.b_v``: the form the
    folded math and :class:`InCAStack` use (no strided slices, and no gradient concatenation, per step)."""
    out = dict(params)
    for packed, names in zip(("attn.in_proj_weight", "attn.in_proj_bias"), _QKV):
        out.update(zip(names, out.pop(packed).chunk(3, dim=dim)))
    return out


def join_qkv(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`split_qkv` (``dim=0``): back to InCA state-dict names."""
    out = dict(params)
    for packed, names in zip(("attn.in_proj_weight", "attn.in_proj_bias"), _QKV):
        out[packed] = torch.cat([out.pop(n) for n in names])
    return out


# ----------------------------------------------------------------------------------------------------
# The folded-attention math on stacked parameters: every tensor in ``p`` has a leading adapter dim E and
# q/k/v split (see split_qkv). Weights are the left operand of their matmuls, so their gradients come out
# in parameter layout: no transposed copies of D x D tensors in backward.
# ----------------------------------------------------------------------------------------------------


def standardise(tokens: Tensor | QuantizedTokens, dtype: torch.dtype = torch.float32) -> Tensor:
    """LayerNorm without affine, in the adapters' ``dtype`` (fp32 for fp16 caches): computed once per layer
    and shared by every adapter reading it. Materialised rather than folded as mean/rstd corrections: one
    fused kernel, cheaper on CPU than computing the statistics alone, and free of cancellation. 8-bit tokens
    (an int8 store) are dequantised straight into ``dtype`` here, where float16 ones are converted: the same
    one pass over the batch, from half the bytes."""
    values = tokens.dequantize(dtype) if isinstance(tokens, QuantizedTokens) else tokens.to(dtype)
    return F.layer_norm(values, tokens.shape[-1:], eps=LN_EPS)


def _affine(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-adapter LayerNorm: ``x [E, ..., D]``, ``weight``/``bias`` ``[E, D]``."""
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (weight.shape[-1],)
    return torch.addcmul(bias.view(shape), F.layer_norm(x, x.shape[-1:], eps=LN_EPS), weight.view(shape))


def _linear_t(weight: Tensor, bias: Tensor, x_t: Tensor) -> Tensor:
    """``(x W^T + b)^T`` from ``x_t = x^T``: ``[E, out, in] x [E, in, N] -> [E, out, N]``."""
    return torch.baddbmm(bias.unsqueeze(2), weight, x_t)


def _fold_queries(p: Mapping[str, Tensor], num_heads: int) -> Tensor:
    """Key projection, LN_z's gain and the 1/sqrt(dh) scale folded into the queries: ``[E, H*m, D]``."""
    query = p["query"]
    e, m, d = query.shape
    dh = d // num_heads
    q_t = _linear_t(p["attn.w_q"], p["attn.b_q"], _affine(query, p["norm_q.weight"], p["norm_q.bias"]).transpose(1, 2))
    # u[e, h, i] = Q[e, i, h] W_k[e, h]: per head [m, dh] x [dh, D]
    u = torch.bmm(q_t.view(e * num_heads, dh, m).transpose(1, 2), p["attn.w_k"].view(e * num_heads, dh, d))
    return u.view(e, num_heads * m, d) * (p["norm_z.weight"] * dh**-0.5).unsqueeze(1)


def _cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _attend(z_hat: Tensor, u: Tensor) -> Tensor:
    """Softmax over tokens of ``z_hat . u`` then pooling of z_hat: ``[B, T, D] x [R, D] -> [R, B, D]``.

    The R rows may belong to many adapters: all their scores come from one ``[B*T, D] x [D, R]`` product
    (whose backward, the gradient of ``u``, is one product over all B*T tokens too), and the pooling is one
    batched product. Pooled rows come out row-major (``[R, B, D]`` view), each adapter's rows contiguous.
    The rows are padded with zero queries to a multiple of :data:`ATTEND_ROWS` (their pooling is dropped), so a
    row's result does not depend on how many others share the products.
    """
    b, t, d = z_hat.shape
    rows = u.shape[0]
    if pad := -rows % ATTEND_ROWS:
        u = torch.cat([u, u.new_zeros(pad, d)])
    weights = torch.mm(z_hat.view(b * t, d), u.t()).view(b, t, -1).softmax(1)
    return torch.bmm(weights.transpose(1, 2), z_hat).transpose(0, 1)[:rows]


def _query_states(p: Mapping[str, Tensor], pooled: Tensor, num_heads: int) -> Tensor:
    """From pooled standardised tokens ``[E*H*m, B, D]`` (adapter, head, query major) to ``LN_out(h)``
    ``[E, m, B, D]``."""
    query = p["query"]
    e, m, d = query.shape
    b, h = pooled.shape[1], num_heads
    # Pool first, project after: ((A z_hat) * gamma + beta) W_v^T + b_v, exact as rows of A sum to 1.
    x = pooled.reshape(e, h * m * b, d)
    x = torch.addcmul(p["norm_z.bias"].unsqueeze(1), x, p["norm_z.weight"].unsqueeze(1))
    values_t = torch.bmm(p["attn.w_v"].view(e * h, d // h, d), x.view(e * h, m * b, d).transpose(1, 2))
    values_t = values_t.view(e, d, m * b) + p["attn.b_v"].unsqueeze(2)
    h_t = _linear_t(p["attn.out_proj.weight"], p["attn.out_proj.bias"], values_t)  # [E, D, m*B]
    states = h_t.transpose(1, 2).view(e, m, b, d) + query.unsqueeze(2)
    if "mlp.fc1.weight" in p:
        x_t = _affine(states, p["norm_mlp.weight"], p["norm_mlp.bias"]).view(e, m * b, d).transpose(1, 2)
        x_t = F.gelu(_linear_t(p["mlp.fc1.weight"], p["mlp.fc1.bias"], x_t))
        states = states + _linear_t(p["mlp.fc2.weight"], p["mlp.fc2.bias"], x_t).transpose(1, 2).view(e, m, b, d)
    return _affine(states, p["norm_out.weight"], p["norm_out.bias"])


def _mean_head(p: Mapping[str, Tensor], states: Tensor) -> Tensor:
    """``head(LN_out(h))`` averaged over queries, as ``head(mean(LN_out(h)))`` (linear): ``[E, B, C]``."""
    return torch.baddbmm(p["head.bias"].unsqueeze(1), states.mean(1), p["head.weight"].transpose(1, 2))


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


class FoldedCrossAttention(nn.Module):
    """Holds the parameters of ``nn.MultiheadAttention(dim, num_heads, batch_first=True)``, same names,
    shapes and initialisation; the adapters run them through the folded path instead of its forward."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight, generator=generator)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5), generator=generator)  # nn.Linear's
        nn.init.zeros_(self.out_proj.bias)


class _QueryReadout(nn.Module):
    """The parts shared by InCA and an Open-InCA class group: queries, norms, attention, optional MLP."""

    def __init__(self, dim: int, num_heads: int, num_queries: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise InCAError(f"adapter width {dim} is not divisible by num_heads={num_heads}; pick a divisor")
        if num_queries < 1 or mlp_ratio < 0:
            raise InCAError(f"bad adapter shape: num_queries={num_queries} must be >= 1, mlp_ratio >= 0")
        self.dim, self.num_heads, self.mlp_ratio = dim, num_heads, float(mlp_ratio)
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_z = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = FoldedCrossAttention(dim)
        if mlp_ratio > 0:
            self.norm_mlp = nn.LayerNorm(dim, eps=LN_EPS)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm_out = nn.LayerNorm(dim, eps=LN_EPS)

    @property
    def num_queries(self) -> int:
        return self.query.shape[0]

    def _init_readout(self, seed: int | None) -> None:
        """Initialise in a fixed order from ``seed`` (global RNG when None). Heads stay zero."""
        g = None if seed is None else torch.Generator().manual_seed(seed)
        nn.init.trunc_normal_(self.query, std=0.02, generator=g)
        self.attn.reset_parameters(g)
        if self.mlp_ratio > 0:
            for fc in (self.mlp.fc1, self.mlp.fc2):
                nn.init.trunc_normal_(fc.weight, std=0.02, generator=g)
                nn.init.zeros_(fc.bias)

    def stacked(self) -> dict[str, Tensor]:
        """Parameters as a stack of one adapter, in the form the folded math takes."""
        return split_qkv({name: t.unsqueeze(0) for name, t in self.named_parameters()}, dim=1)


class InCA(_QueryReadout):
    """One InCA adapter: ``tokens [B, T, D] -> logits [B, C]`` by folded cross-attention.

    Parameter names and shapes are those of :class:`InCAReference` (``query``, ``norm_q``, ``norm_z``,
    ``attn.in_proj_weight``, ``attn.out_proj``, ``norm_out``, ``head``; ``norm_mlp``/``mlp`` when
    ``mlp_ratio > 0``), which gives the same outputs from the same state dict.

    Initialisation: queries and MLP weights trunc-normal(0.02), attention as ``nn.MultiheadAttention``,
    LayerNorms identity, and a *zero* head, so every adapter starts from uniform predictions (loss
    log C) whatever its seed and width; the attention gets gradients from the second step on.
    ``seed`` makes the initial weights reproducible per adapter (global RNG when None).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_heads: int = 8,
        num_queries: int = 1,
        mlp_ratio: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(dim, num_heads, num_queries, mlp_ratio)
        self.num_classes = num_classes
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._init_readout(seed)

    def forward(self, tokens: Tensor) -> Tensor:
        p = self.stacked()
        pooled = _attend(standardise(tokens, self.query.dtype), _fold_queries(p, self.num_heads)[0])
        return _mean_head(p, _query_states(p, pooled, self.num_heads))[0]


class InCAReference(InCA):
    """The slow definition of InCA through ``nn.MultiheadAttention``: same parameters, same outputs.

    It states the exactness contract of the folded path; tests and ``tools/bench_inca.py`` compare
    against it. Load an :class:`InCA` state dict into it to run the same adapter.
    """

    def __init__(
        self, dim: int, num_classes: int, num_heads: int = 8, num_queries: int = 1, mlp_ratio: float = 0.0
    ) -> None:
        super().__init__(dim, num_classes, num_heads, num_queries, mlp_ratio)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        q = self.query.expand(tokens.shape[0], -1, -1)
        z = self.norm_z(tokens)
        h = q + self.attn(self.norm_q(q), z, z, need_weights=False)[0]
        if self.mlp_ratio > 0:
            h = h + self.mlp(self.norm_mlp(h))
        return self.head(self.norm_out(h)).mean(1)


# ----------------------------------------------------------------------------------------------------
# Open-InCA
# ----------------------------------------------------------------------------------------------------


class OpenInCAGroup(_QueryReadout):
    """Classes learnt together: one query per class, attention shared by them, a diagonal head."""

    def __init__(self, dim: int, classes: Sequence[str], num_heads: int, mlp_ratio: float, seed: int | None) -> None:
        super().__init__(dim, num_heads, len(classes), mlp_ratio)
        self.classes = list(classes)
        self.head_weight = nn.Parameter(torch.zeros(len(classes), dim))
        self.head_bias = nn.Parameter(torch.zeros(len(classes)))
        self._init_readout(seed)

    def logits(self, pooled: Tensor) -> Tensor:
        """``[H*m, B, D]`` pooled tokens -> ``[B, m]``: logit_c = w_c . LN_out(h_c) + b_c."""
        p = self.stacked()
        states = _query_states(p, pooled, self.num_heads)[0]  # [m, B, D]
        return ((states * self.head_weight.unsqueeze(1)).sum(-1) + self.head_bias.unsqueeze(1)).t()

    def keep(self, rows: Tensor) -> None:
        """Keep only the classes at ``rows`` (sorted local indices)."""
        self.query = nn.Parameter(self.query.detach()[rows].clone())
        self.head_weight = nn.Parameter(self.head_weight.detach()[rows].clone())
        self.head_bias = nn.Parameter(self.head_bias.detach()[rows].clone())
        self.classes = [self.classes[i] for i in rows.tolist()]


class OpenInCA(nn.Module):
    """Class-incremental InCA: one query per class and a diagonal head, ``logit_c = w_c . LN_out(h_c) + b_c``.

    A query's path never mixes with another's (softmax, MLP and LN_out act per query), so a class's logit
    depends only on its own query, head row, and the attention weights it was trained with. Adapters
    trained separately have different attention weights, so the model is a list of class **groups**
    (``groups.<g>.query [m_g, D]``, ``groups.<g>.head_weight [m_g, D]``, ``groups.<g>.head_bias [m_g]``,
    and that group's ``norm_q``, ``norm_z``, ``attn``, ``norm_out``, MLP), each class routed through its
    own group's attention. :meth:`merge` concatenates groups, so the merged model's logit for every
    class equals the logit of the adapter that learnt it; :meth:`remove_classes` drops rows. All groups
    share one standardisation of the tokens and one pass of scores and pooling over them.

    Class order is the concatenation of the groups' classes; ``classes`` holds their names (default
    ``"0" .. "C-1"``; name them to merge, since merged names must be disjoint).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_heads: int = 8,
        mlp_ratio: float = 0.0,
        classes: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        classes = [str(c) for c in range(num_classes)] if classes is None else list(classes)
        if len(classes) != num_classes or len(set(classes)) != num_classes:
            raise InCAError(f"OpenInCA needs {num_classes} distinct class names, got {len(set(classes))}")
        self.dim = dim
        self.groups = nn.ModuleList([OpenInCAGroup(dim, classes, num_heads, mlp_ratio, seed)])

    @property
    def classes(self) -> list[str]:
        return [c for g in self.groups for c in g.classes]

    @property
    def num_classes(self) -> int:
        return sum(len(g.classes) for g in self.groups)

    def forward(self, tokens: Tensor) -> Tensor:
        us = [_fold_queries(g.stacked(), g.num_heads)[0] for g in self.groups]
        pooled = _attend(standardise(tokens, self.groups[0].query.dtype), _cat(us))
        parts = pooled.split([u.shape[0] for u in us])
        return torch.cat([g.logits(part) for g, part in zip(self.groups, parts)], dim=1)

    @classmethod
    def merge(cls, adapters: Sequence[OpenInCA]) -> OpenInCA:
        """A new adapter over the union of the adapters' classes (copies; the inputs are unchanged)."""
        if not adapters:
            raise InCAError("OpenInCA.merge needs at least one adapter")
        names = [c for a in adapters for c in a.classes]
        if len(set(names)) != len(names):
            dup = sorted({c for c in names if names.count(c) > 1})
            raise InCAError(f"cannot merge Open-InCA adapters sharing classes {dup[:5]}; give them distinct names")
        if len({a.dim for a in adapters}) > 1:
            raise InCAError(f"cannot merge Open-InCA adapters of widths {sorted({a.dim for a in adapters})}")
        if len({(p.device, p.dtype) for a in adapters for p in a.parameters()}) > 1:
            raise InCAError("cannot merge Open-InCA adapters on different devices/dtypes; move them first")
        merged = copy.deepcopy(adapters[0])
        for a in adapters[1:]:
            merged.groups.extend(copy.deepcopy(list(a.groups)))
        return merged

    def remove_classes(self, classes: Iterable[int | str]) -> None:
        """Remove classes, given by index or name, in place (new parameter tensors: rebuild optimizers)."""
        names = self.classes
        drop = set()
        for c in classes:
            if isinstance(c, str):
                if c not in names:
                    raise InCAError(f"no class named {c!r} in this Open-InCA adapter; it has {names[:10]}")
                c = names.index(c)
            if not 0 <= c < len(names):
                raise InCAError(f"class index {c} out of range for an Open-InCA adapter of {len(names)} classes")
            drop.add(c)
        if len(drop) == len(names):
            raise InCAError("cannot remove every class of an Open-InCA adapter")
        start, kept = 0, []
        for g in self.groups:
            rows = [i for i in range(len(g.classes)) if start + i not in drop]
            start += len(g.classes)
            if rows:
                g.keep(torch.tensor(rows, dtype=torch.long))
                kept.append(g)
        self.groups = nn.ModuleList(kept)


# ----------------------------------------------------------------------------------------------------
# InCABank
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a bank: which layer it reads, its shape, optimiser settings and init seed."""

    layer: int
    num_heads: int
    num_queries: int = 1
    mlp_ratio: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int, float]:
        return self.num_heads, self.num_queries, float(self.mlp_ratio)


def _two_rows_at_least(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """A stack of one adapter as two, the second a detached copy whose results are dropped: torch runs a batch of
    one matrix product as a plain product, whose kernel rounds differently, so with it a lone adapter gets the bits
    it gets among others (its copy doubles that stack's small per-adapter work; no gradient flows through it)."""
    if params["query"].shape[0] > 1:
        return params
    return {name: torch.cat([t, t.detach()]) for name, t in params.items()}


def _flat(name: str) -> str:
    return name.replace(".", "_")


class InCAStack(nn.Module):
    """Adapters of one shape, each parameter stacked along a leading adapter dimension, q/k/v split
    (:func:`split_qkv`; registered with ``.`` replaced by ``_``, e.g. ``attn_w_q [E, D, D]``)."""

    def __init__(self, adapters: Sequence[InCA]) -> None:
        super().__init__()
        first = adapters[0]
        self.num_heads, self.num_queries, self.mlp_ratio = first.num_heads, first.num_queries, first.mlp_ratio
        rows = [split_qkv({k: v.detach() for k, v in a.named_parameters()}) for a in adapters]
        self.names = list(rows[0])
        for name in self.names:
            self.register_parameter(_flat(name), nn.Parameter(torch.stack([r[name] for r in rows])))

    def __len__(self) -> int:
        return self.query.shape[0]

    def params(self) -> dict[str, Tensor]:
        """The stacked parameters under their split-q/k/v InCA names (``query``, ``attn.w_q``, ...)."""
        return {name: getattr(self, _flat(name)) for name in self.names}

    def state_of(self, row: int) -> dict[str, Tensor]:
        """The state dict of the :class:`InCA` at ``row``."""
        return join_qkv({name: t[row] for name, t in self.params().items()})


class InCABank(nn.Module):
    """E InCA adapters trained together: ``features {layer: [B, T, D]} -> logits [E, B, C]`` (spec order).

    Adapters are grouped into :class:`InCAStack` s by shape (heads, queries, mlp_ratio) so their
    parameters are stacked and run by batched matmuls; within a stack they are ordered by layer. The
    token-side work, which dominates, is shared by layer: the adapters reading a layer (whatever their stack)
    share one standardisation of its tokens, one ``[B*T, D] x [D, sum of H*m]`` product with all their folded
    queries, one softmax and one batched pooling (:func:`_attend`); only the value and output projections,
    MLPs and heads run per adapter, batched per stack.

    Adapter e starts with the weights of ``InCA(dim, num_classes, ..., seed=specs[e].seed)``.
    ``diverged`` (bool ``[E]``, a buffer, so it is checkpointed) marks adapters frozen by the trainer.
    """

    def __init__(self, specs: Sequence[AdapterSpec], dim: int, num_classes: int) -> None:
        super().__init__()
        if not specs:
            raise InCAError("an InCABank needs at least one adapter spec")
        self.specs = list(specs)
        self.dim, self.num_classes = dim, num_classes
        by_shape: dict[tuple, list[int]] = {}
        for i, spec in enumerate(self.specs):
            by_shape.setdefault(spec.shape, []).append(i)
        members = [sorted(idx, key=lambda i: self.specs[i].layer) for idx in by_shape.values()]
        self.stacks = nn.ModuleList(
            InCAStack([self._fresh(self.specs[i], seed=self.specs[i].seed) for i in idx]) for idx in members
        )
        self._members = members
        self._where = {i: (s, row) for s, idx in enumerate(members) for row, i in enumerate(idx)}
        concat = [i for idx in members for i in idx]
        self.register_buffer("_order", torch.tensor([concat.index(i) for i in range(len(concat))]), persistent=False)
        self._identity_order = concat == sorted(concat)
        self.layers = sorted({s.layer for s in self.specs})
        self._plan = []  # per layer: (stack, first row, end row) runs of adapters reading it
        for layer in self.layers:
            runs = []
            for s, idx in enumerate(members):
                rows = [row for row, i in enumerate(idx) if self.specs[i].layer == layer]
                if rows:
                    runs.append((s, rows[0], rows[-1] + 1))
            self._plan.append((layer, runs))
        self.register_buffer("diverged", torch.zeros(len(self.specs), dtype=torch.bool))

    def _fresh(self, spec: AdapterSpec, seed: int) -> InCA:
        return InCA(self.dim, self.num_classes, spec.num_heads, spec.num_queries, spec.mlp_ratio, seed=seed)

    def __len__(self) -> int:
        return len(self.specs)

    def locate(self, i: int) -> tuple[InCAStack, int]:
        """The stack holding adapter ``i`` and its row there."""
        s, row = self._where[i]
        return self.stacks[s], row

    def forward(self, features: Mapping[int, Tensor]) -> Tensor:
        missing = [layer for layer in self.layers if layer not in features]
        if missing:
            raise InCAError(f"features lack layers {missing} that the bank's adapters read; provide {self.layers}")
        ps = [_two_rows_at_least(stack.params()) for stack in self.stacks]
        us = [_fold_queries(p, stack.num_heads) for p, stack in zip(ps, self.stacks)]  # [E_s, H*m, D]
        dtype = self.stacks[0].query.dtype
        parts: list[list[Tensor]] = [[] for _ in self.stacks]
        for layer, runs in self._plan:
            u = [us[s][a:b].flatten(0, 1) for s, a, b in runs]
            pooled = _attend(standardise(features[layer], dtype), _cat(u))
            for (s, _, _), part in zip(runs, pooled.split([x.shape[0] for x in u])):
                parts[s].append(part)
        logits = []
        for p, stack, part in zip(ps, self.stacks, parts):
            pooled = _cat(part)
            if len(stack) == 1:  # its copy's rows too (see _two_rows_at_least)
                pooled = torch.cat([pooled, pooled.detach()])
            logits.append(_mean_head(p, _query_states(p, pooled, stack.num_heads))[: len(stack)])
        out = _cat(logits)
        return out if self._identity_order else out.index_select(0, self._order)

    def subset(self, indices: Sequence[int]) -> InCABank:
        """A new bank of the adapters at ``indices`` (kept in spec order) with their current weights and divergence
        flags, copied, on this bank's device: the survivors successive halving goes on training. Its stacks, plan
        and layers hold only them, so a layer none of them reads is no longer asked for."""
        kept = sorted(set(indices))
        if not kept or kept[0] < 0 or kept[-1] >= len(self):
            raise InCAError(f"a subset of a bank of {len(self)} adapters needs indices in 0..{len(self) - 1}")
        like = self.stacks[0].query
        bank = InCABank([self.specs[i] for i in kept], self.dim, self.num_classes).to(like.device, like.dtype)
        with torch.no_grad():
            for new, old in enumerate(kept):
                (target, row), (source, old_row) = bank.locate(new), self.locate(old)
                weights = source.params()
                for name, tensor in target.params().items():
                    tensor[row] = weights[name][old_row]
            bank.diverged.copy_(self.diverged[kept])
        return bank

    def adapter(self, i: int) -> InCA:
        """Adapter ``i`` as a plain :class:`InCA` with the same weights (a copy), on the bank's device."""
        stack, row = self.locate(i)
        module = self._fresh(self.specs[i], seed=0)
        module.load_state_dict(stack.state_of(row))
        return module.to(stack.query.device)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for :class:`inca.train.optim.BatchedAdamW`: per stack, decayed and not."""
        groups = []
        for stack, ids in zip(self.stacks, self._members):
            lr = [self.specs[i].lr for i in ids]
            for decayed in (True, False):
                params = [t for name, t in stack.params().items() if uses_weight_decay(name) == decayed]
                wd = [self.specs[i].weight_decay if decayed else 0.0 for i in ids]
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "adapters": ids})
        return groups
