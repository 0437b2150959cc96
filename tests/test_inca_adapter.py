"""InCA and Open-InCA: the folded attention is exact to nn.MultiheadAttention; merging; saving."""

import pytest
import torch
from torch import nn

from inca.adapters.inca import InCA, InCAReference, OpenInCA
from inca.errors import InCAError

from .conftest import assert_rel, randomise, tokens


def reference_of(adapter: InCA) -> InCAReference:
    ref = InCAReference(adapter.dim, adapter.num_classes, adapter.num_heads, adapter.num_queries, adapter.mlp_ratio)
    ref.load_state_dict(adapter.state_dict())
    return ref.to(next(adapter.parameters()).dtype)


@pytest.mark.parametrize(
    "dim,heads,queries,mlp_ratio",
    [(32, 1, 1, 0.0), (48, 4, 1, 0.0), (64, 8, 3, 0.0), (48, 6, 2, 2.0), (64, 4, 5, 0.5)],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-11)])
def test_folded_attention_equals_multihead_attention(dim, heads, queries, mlp_ratio, dtype, tol):
    adapter = randomise(InCA(dim, 7, heads, queries, mlp_ratio, seed=0)).to(dtype)
    ref = reference_of(adapter)
    z = tokens(3, 11, dim, dtype=dtype)
    z_fold, z_ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, out_ref = adapter(z_fold), ref(z_ref)
    assert out.shape == (3, 7)
    assert_rel(out, out_ref, tol)
    weights = torch.randn(out.shape, dtype=dtype)
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    assert_rel(z_fold.grad, z_ref.grad, tol)
    grads_ref = dict(ref.named_parameters())
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_rel(p.grad, grads_ref[name].grad, tol)


def test_parameter_names_and_shapes_match_multihead_attention():
    adapter = InCA(48, 5, num_heads=6, num_queries=2, mlp_ratio=1.5)
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert shapes["query"] == (2, 48)
    assert shapes["attn.in_proj_weight"] == (144, 48) and shapes["attn.in_proj_bias"] == (144,)
    assert shapes["attn.out_proj.weight"] == (48, 48) and shapes["head.weight"] == (5, 48)
    assert shapes["mlp.fc1.weight"] == (72, 48) and shapes["norm_mlp.weight"] == (48,)
    mha = nn.MultiheadAttention(48, 6, batch_first=True)
    assert {f"attn.{k}": tuple(v.shape) for k, v in mha.state_dict().items()}.items() <= shapes.items()


def test_seeded_initialisation():
    a, b, c = InCA(32, 4, 4, seed=3), InCA(32, 4, 4, seed=3), InCA(32, 4, 4, seed=4)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if name in ("query", "attn.in_proj_weight", "attn.out_proj.weight"):
            assert not torch.equal(pa, pc), name
    assert a.head.weight.abs().sum() == 0 and a.attn.in_proj_bias.abs().sum() == 0
    assert a.query.abs().max() <= 2 * 0.02 * 3  # trunc-normal(0.02), truncated far out
    assert torch.allclose(a(tokens(2, 5, 32)), torch.zeros(2, 4))  # zero head: uniform start


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(InCAError, match="divisible"):
        InCA(30, 3, num_heads=4)
    with pytest.raises(InCAError, match="num_queries"):
        InCA(32, 3, num_heads=4, num_queries=0)


# ---------------------------------------------------------------------------------------------------- Open-InCA


def open_reference_logits(model: OpenInCA, z: torch.Tensor) -> torch.Tensor:
    """Open-InCA's definition, per group, through nn.MultiheadAttention."""
    out = []
    for g in model.groups:
        mha = nn.MultiheadAttention(model.dim, g.num_heads, batch_first=True)
        mha.load_state_dict(g.attn.state_dict())
        q = g.query.expand(z.shape[0], -1, -1)
        zn = g.norm_z(z)
        h = q + mha(g.norm_q(q), zn, zn, need_weights=False)[0]
        if g.mlp_ratio > 0:
            h = h + g.mlp(g.norm_mlp(h))
        out.append((g.norm_out(h) * g.head_weight).sum(-1) + g.head_bias)
    return torch.cat(out, dim=1)


def test_open_inca_is_per_class_cross_attention_with_diagonal_head():
    model = randomise(OpenInCA(32, 5, num_heads=4, classes=list("abcde")))
    z = tokens(3, 7, 32)
    assert_rel(model(z), open_reference_logits(model, z), 1e-5)


def test_open_inca_merge_keeps_every_class_logit_and_remove_classes():
    z = tokens(4, 10, 32)
    first = randomise(OpenInCA(32, 3, num_heads=4, classes=["cat", "dog", "owl"], seed=0), seed=1)
    second = randomise(OpenInCA(32, 2, num_heads=2, mlp_ratio=1.0, classes=["car", "bus"], seed=1), seed=2)
    merged = OpenInCA.merge([first, second])
    assert merged.classes == ["cat", "dog", "owl", "car", "bus"] and merged.num_classes == 5
    logits = merged(z)
    assert_rel(logits[:, :3], first(z), 1e-6)
    assert_rel(logits[:, 3:], second(z), 1e-6)
    assert_rel(logits, open_reference_logits(merged, z), 1e-5)
    assert first.num_classes == 3  # inputs untouched

    merged.remove_classes(["dog", 3])
    assert merged.classes == ["cat", "owl", "bus"]
    assert_rel(merged(z), logits[:, [0, 2, 4]], 1e-6)
    merged.remove_classes(["bus"])
    assert len(merged.groups) == 1 and merged.classes == ["cat", "owl"]
    with pytest.raises(InCAError, match="every class"):
        merged.remove_classes([0, 1])
    with pytest.raises(InCAError, match="out of range"):
        merged.remove_classes([5])


def test_open_inca_merge_rejects_shared_class_names():
    with pytest.raises(InCAError, match="sharing classes"):
        OpenInCA.merge([OpenInCA(16, 2, num_heads=2), OpenInCA(16, 2, num_heads=2)])
