"""8-bit tokens: the scheme's accuracy on tokens with massive activations, its bytes, and tensor-like use."""

import pytest
import torch
import torch.nn.functional as F

from inca.adapters.inca import standardise
from inca.errors import InCAError
from inca.quantize import Int8Layout, QuantizedTokens, quantize

from .conftest import tokens


def massive(b: int = 8, t: int = 50, d: int = 384, seed: int = 0) -> torch.Tensor:
    """ViT-like tokens with the outliers the scheme must survive: a few channels 20x larger in every token, and
    in 2% of the tokens two channels at 300x the median (Sun et al. 2024's massive activations)."""
    g = torch.Generator().manual_seed(seed)
    x = tokens(b, t, d, seed=seed)
    x[..., torch.randperm(d, generator=g)[:4]] *= 20
    median = x.abs().median()
    for row in range(b):
        for token in torch.randperm(t, generator=g)[: max(1, t // 50)]:
            x[row, token, [7, d // 3]] = torch.tensor([300.0, -300.0]) * median
    return x


def rest_cosine(approx: torch.Tensor, exact: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Per-token cosine over all but each token's ``k`` largest channels: what a crushed token loses."""
    keep = torch.ones_like(exact, dtype=torch.bool).scatter_(-1, exact.abs().topk(k, -1).indices, False)
    return F.cosine_similarity(torch.where(keep, approx, 0), torch.where(keep, exact, 0), dim=-1)


@pytest.mark.parametrize("dim", [192, 384, 768, 1024, 1280])
def test_layout_bytes_within_target(dim):
    layout = Int8Layout(dim)
    assert dim % layout.group == 0 and layout.group <= 64
    assert layout.width / (2 * dim) <= 0.55  # scales and outliers included


def test_massive_activations_keep_every_channel():
    x = massive()
    y = quantize(x).dequantize()
    cosine = F.cosine_similarity(y, x, dim=-1)
    assert cosine.min() >= 0.999 and cosine.mean() >= 0.9999
    assert rest_cosine(y, x).min() >= 0.999  # the massive tokens' other channels survive
    one_scale = x.abs().amax(-1, keepdim=True) / 127  # what a single per-token scale would do to them
    crushed = (x / one_scale).round() * one_scale
    assert rest_cosine(crushed, x).min() < 0.99


def test_outliers_are_kept_in_float16_and_quantizing_is_deterministic():
    x = massive(d=192)
    packed = quantize(x)
    y = packed.dequantize()
    top = x.abs().topk(packed.layout.outliers, -1).indices
    assert torch.equal(y.gather(-1, top), x.gather(-1, top).half().float())
    assert torch.equal(quantize(x.clone()).raw, packed.raw)


def test_zero_groups_and_overflow():
    x = torch.zeros(2, 3, 192)
    x[0, 0, 0] = 1.0
    assert torch.equal(quantize(x).dequantize(), x)
    x[1, 1, 5] = 1e6
    with pytest.raises(InCAError, match="overflow float16"):
        quantize(x)
    for bad in (float("nan"), float("inf")):
        x[1, 1, 5:9] = bad  # more of them than a token keeps as outliers
        with pytest.raises(InCAError, match="NaN or infinity"):
            quantize(x)


def test_tensor_like_use():
    x = massive(b=6, d=192)
    packed = quantize(x)
    rows = torch.tensor([0, 2, 5])
    picked = packed[rows]
    assert isinstance(picked, QuantizedTokens) and picked.shape == (3, 50, 192)
    assert torch.equal(picked.dequantize(), packed.dequantize()[rows])
    assert isinstance(packed.to("cpu"), QuantizedTokens)
    assert packed.to(torch.float16).dtype == torch.float16
    assert packed[:, 0].shape == (6, 192) and packed.float().shape == (6, 50, 192)
    assert bool(torch.isfinite(packed).all())
    assert torch.equal(standardise(packed), standardise(packed.dequantize()))
    with pytest.raises(InCAError, match="int8 rows"):
        QuantizedTokens(packed.raw[..., :-1], packed.layout)
