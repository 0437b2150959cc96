"""8-bit activations: per-token scales over channel groups, with each token's largest values kept in float16.

A ViT's block outputs hold a few values far larger than the rest: fixed channels that are large in every token,
and "massive activations" of a few hundred times the median in a few channels of a few tokens (Darcet et al.,
"Vision Transformers Need Registers", ICLR 2024; Sun et al., "Massive Activations in Large Language Models",
2024, which finds them in ViTs too). One scale per token would spend its 8 bits on those values and round the
token's other channels to a handful of levels; one scale per channel would do the same to every other token in
the outlier channels. This scheme (inca's own choice, by measurement: ``tools/bench_activations.py --schemes``
and the table in ``inca/cache.py``) quantises each token on its own:

* its ``K = max(1, D // 96)`` values of largest magnitude are kept as float16 with their channel (int16), as
  LLM.int8() keeps outlier features in 16 bits (Dettmers et al., NeurIPS 2022), but per token, so no fit over
  the data is needed and a resumed build stays byte-identical;
* the other values, in groups of ``G`` consecutive channels (the largest divisor of ``D`` up to 64), are rounded
  symmetrically to int8 with one float16 scale (absmax / 127) per group, as per-group scales do for weights
  (GPTQ and AWQ use groups of 128; 64 halves the reach of an outlier the top-K missed).

A token is one packed row of ``W = D + 2 D/G + 4 K`` bytes: ``[int8 values | float16 scales | float16 outlier
values | int16 outlier channels]``: about ``D + D/32 + D/24`` bytes against float16's ``2 D``, 0.536x for timm's
ViT widths (192 to 1280). Dequantising is one conversion, one broadcast multiply and one scatter of K values per
token (the small parts after the values are copied out together): the adapters do it inside the standardisation
every batch already goes through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from .errors import InCAError

__all__ = ["INT8_SCHEME", "Int8Layout", "QuantizedTokens", "quantize"]

# What a store's manifest records about its 8-bit rows (a store of any other scheme is refused, never misread).
INT8_SCHEME = {"name": "token-groups+outliers", "max_group": 64, "channels_per_outlier": 96, "scale": "float16",
               "row": "int8 values | float16 group scales | float16 outlier values | int16 outlier channels"}


@dataclass(frozen=True)
class Int8Layout:
    """Where each part of a packed token row lives, for tokens of width ``dim``."""

    dim: int

    @cached_property
    def group(self) -> int:
        return max(g for g in range(1, min(self.dim, INT8_SCHEME["max_group"]) + 1) if self.dim % g == 0)

    @cached_property
    def outliers(self) -> int:
        return max(1, self.dim // INT8_SCHEME["channels_per_outlier"])

    @cached_property
    def groups(self) -> int:
        return self.dim // self.group

    @cached_property
    def width(self) -> int:
        """Bytes of one packed token row."""
        return self.dim + 2 * self.groups + 4 * self.outliers


def quantize(tokens: Tensor) -> QuantizedTokens:
    """``[..., D]`` float tokens -> :class:`QuantizedTokens` (on the tokens' device; deterministic for a given
    input, so a resumed store build writes the same bytes). Refuses tokens whose outliers overflow float16."""
    x = tokens.float()
    layout = Int8Layout(x.shape[-1])
    top = x.abs().topk(layout.outliers, dim=-1).indices  # NaN ranks above every number: it lands in the outliers
    outliers = x.gather(-1, top)
    rest = x.scatter(-1, top, 0.0).unflatten(-1, (layout.groups, layout.group))
    absmax = rest.abs().amax(-1)
    if not (torch.isfinite(outliers).all() and torch.isfinite(absmax).all()):
        raise InCAError("activations hold NaN or infinity: they cannot be stored")
    outlier_values = outliers.half()
    if not torch.isfinite(outlier_values).all():
        raise InCAError("activations overflow float16 (beyond 65504): store them as bfloat16 instead of int8")
    scales = (absmax / 127).half()  # at most the outliers' magnitude over 127: finite in float16
    step = scales.float().unsqueeze(-1).clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero group: 0 / tiny
    values = (rest / step).round_().clamp_(-127, 127).to(torch.int8).flatten(-2)
    raw = torch.cat([values, scales.view(torch.int8), outlier_values.view(torch.int8),
                     top.to(torch.int16).view(torch.int8)], -1)
    return QuantizedTokens(raw, layout)


class QuantizedTokens:
    """Tokens ``[..., D]`` held as packed 8-bit rows ``raw`` (``[..., W]`` int8, see :class:`Int8Layout`).

    Moving them (``.to(device)``, ``pin_memory``) and selecting rows (``tokens[rows]``) keep the 8-bit form, so
    a batch crosses to the GPU at a quarter of float32's bytes; :meth:`dequantize` gives the float tensor. Any
    other torch function or tensor method applied to them (``torch.isfinite``, ``.float()``, ``tokens[:, 0]``)
    sees the dequantised float32 tensor (torch's ``__torch_function__`` protocol), so code written for tensors
    reads them unchanged."""

    def __init__(self, raw: Tensor, layout: Int8Layout) -> None:
        if raw.dtype != torch.int8 or raw.shape[-1] != layout.width:
            raise InCAError(f"packed 8-bit tokens need int8 rows of {layout.width} bytes, got {raw.dtype} "
                            f"{tuple(raw.shape)}")
        self.raw, self.layout = raw, layout

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.raw.shape[:-1], self.layout.dim))

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def __len__(self) -> int:
        return self.raw.shape[0]

    def dim(self) -> int:
        return self.raw.dim()

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float tokens ``[..., D]`` in ``dtype``: values times their group's scale, outliers put back."""
        d, s, k = self.layout.dim, self.layout.groups, self.layout.outliers
        small = self.raw[..., d:].contiguous().view(torch.int16)  # [..., S + 2K]: 2-byte values, one copy
        halves = small[..., : s + k].view(torch.float16).to(dtype)  # the group scales, then the outlier values
        out = self.raw[..., :d].to(dtype)
        out.view(-1, self.layout.group).mul_(halves[..., :s].reshape(-1, 1))  # 2-D: torch's fast broadcast
        return out.scatter_(-1, small[..., s + k :].long(), halves[..., s:])

    def to(self, *args: Any, **kwargs: Any) -> QuantizedTokens | Tensor:
        """To a device: still 8-bit. To a dtype: the dequantised tensor in it (then on the device asked)."""
        dtype = kwargs.pop("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        args = tuple(a for a in args if not isinstance(a, torch.dtype))
        if dtype is not None:
            return self.dequantize().to(*args, dtype=dtype, **kwargs)
        return QuantizedTokens(self.raw.to(*args, **kwargs), self.layout)

    def pin_memory(self) -> QuantizedTokens:
        return QuantizedTokens(self.raw.pin_memory(), self.layout)

    def __getitem__(self, index: Any) -> QuantizedTokens | Tensor:
        """Rows (an index of the first dimension) stay 8-bit; any other indexing dequantises first."""
        if isinstance(index, tuple) or index is Ellipsis or index is None:
            return self.dequantize()[index]
        return QuantizedTokens(self.raw[index], self.layout)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """Any other tensor method, on the dequantised float32 tokens."""
        if name.startswith("_") or not hasattr(Tensor, name):
            raise AttributeError(name)
        return getattr(self.dequantize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206 (torch's protocol)
        def plain(value: Any) -> Any:
            if isinstance(value, QuantizedTokens):
                return value.dequantize()
            if isinstance(value, (list, tuple)):
                return type(value)(plain(v) for v in value)
            return value

        return func(*plain(tuple(args)), **{k: plain(v) for k, v in (kwargs or {}).items()})

    def __repr__(self) -> str:
        return f"QuantizedTokens(shape={tuple(self.shape)}, group={self.layout.group}, " \
               f"outliers={self.layout.outliers}, device={self.device})"
