import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from inca.adapters.common import count_parameters
from inca.adapters.compacter import (
    AdaptedSublayer,
    LPHMLinear,
    apply_compacter,
    bottleneck_width,
    load_compacter,
    save_compacter,
)
from inca.errors import InCAError

DIM, DEPTH, CLASSES = 192, 4, 10


@functools.cache
def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=DEPTH, num_classes=CLASSES
    ).eval()


def tiny_vit() -> nn.Module:
    return copy.deepcopy(_backbone())


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def lphm_params(d_in: int, d_out: int, n: int, r: int) -> int:
    """Compacter paper: s_i, t_i for i = 1..n (rank r), plus the bias; the rule tensor is counted once."""
    return n * r * (d_in // n + d_out // n) + d_out


def test_lphm_weight_is_the_papers_sum_of_kronecker_products():
    n, r, d_in, d_out = 4, 2, 8, 12
    rule = nn.Parameter(torch.randn(n, n, n))
    layer = LPHMLinear(d_in, d_out, rule, rank=r)
    with torch.no_grad():
        layer.bias.normal_()
    assert layer.s.shape == (n, d_out // n, r) and layer.t.shape == (n, d_in // n, r)
    expected = sum(torch.kron(rule[i], layer.s[i] @ layer.t[i].T) for i in range(n))  # W = sum A_i (x) s_i t_i^T
    torch.testing.assert_close(layer.phm_weight(), expected)
    x = torch.randn(5, d_in)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias)


def test_init_is_close_to_the_backbone():
    base, model = tiny_vit(), tiny_vit()
    apply_compacter(model, reduction=16)
    x = images()
    with torch.no_grad():
        y0, y1 = base(x), model(x)
    assert (y1 - y0).norm() <= 1e-3 * y0.norm()
    rule = model.blocks[0].mlp.adapter.down.rule
    assert 0.3e-4 < rule.std().item() < 3e-4  # N(0, std 1e-4)
    assert not model.blocks[0].mlp.adapter.up.bias.any()


def test_rule_tensor_is_one_parameter_shared_by_every_layer():
    model = tiny_vit()
    apply_compacter(model, reduction=16)
    layers = [m for m in model.modules() if isinstance(m, LPHMLinear)]
    assert len(layers) == 2 * 2 * DEPTH
    assert all(layer.rule is layers[0].rule for layer in layers)
    assert sum(name.endswith(".rule") for name, _ in model.named_parameters()) == 1
    F.cross_entropy(model(images()), torch.arange(4)).backward()
    assert layers[0].rule.grad is not None and layers[0].rule.grad.abs().sum() > 0


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("train_norms", [True, False])
def test_trainable_parameter_count_matches_the_formula(plus, train_norms):
    n, r, reduction = 4, 1, 16
    model = tiny_vit()
    apply_compacter(model, phm_dim=n, rank=r, reduction=reduction, plus=plus, train_norms=train_norms)
    bottleneck = DIM // reduction
    per_adapter = lphm_params(DIM, bottleneck, n, r) + lphm_params(bottleneck, DIM, n, r)
    adapters = DEPTH * (1 if plus else 2)
    layer_norms = (2 * DEPTH + 1) * 2 * DIM  # norm1, norm2 per block and the final norm, weight + bias
    head = DIM * CLASSES + CLASSES
    expected = adapters * per_adapter + n**3 + (layer_norms if train_norms else 0) + head
    count = count_parameters(model)
    assert count.trainable == expected
    assert count.total == sum(p.numel() for p in tiny_vit().parameters()) + adapters * per_adapter + n**3


def test_compacter_plus_adapts_only_the_mlps():
    model = tiny_vit()
    names = apply_compacter(model, reduction=16, plus=True)
    assert names == [f"blocks.{i}.mlp" for i in range(DEPTH)]
    assert not any(isinstance(b.attn, AdaptedSublayer) for b in model.blocks)
    full = tiny_vit()
    assert apply_compacter(full, reduction=16) == [f"blocks.{i}.{k}" for i in range(DEPTH) for k in ("attn", "mlp")]


def test_adapter_sits_on_the_sublayer_output_before_the_residual():
    model = tiny_vit()
    apply_compacter(model, reduction=16)
    with torch.no_grad():  # make the adapters matter
        model.blocks[0].mlp.adapter.down.rule.normal_()
    block, x = model.blocks[0], torch.randn(2, 17, DIM)
    with torch.no_grad():
        h = x + block.attn.adapter(block.attn.base_layer(block.norm1(x)))
        expected = h + block.mlp.adapter(block.mlp.base_layer(block.norm2(h)))
        assert not torch.allclose(expected, tiny_vit().blocks[0](x), atol=1e-3)
        torch.testing.assert_close(block(x), expected)


def test_width_not_divisible_by_phm_dim_is_a_clear_error():
    model = tiny_vit()
    with pytest.raises(InCAError, match="width 192, not divisible by phm_dim 5"):
        apply_compacter(model, phm_dim=5)
    assert not any(isinstance(m, AdaptedSublayer) for m in model.modules())  # nothing half-applied
    apply_compacter(model, reduction=16)
    with pytest.raises(InCAError, match="already has a Compacter adapter"):
        apply_compacter(model, reduction=16)


def test_a_bottleneck_off_the_phm_grid_is_rounded_up_and_logged(caplog):
    assert [bottleneck_width(192, r, 4) for r in (32, 16, 8, 500)] == [8, 12, 24, 4]
    model = tiny_vit()
    with caplog.at_level("INFO", logger="inca.adapters.compacter"):
        apply_compacter(model, phm_dim=4, reduction=32)  # ViT-Ti at the authors' default: 192 // 32 = 6
    assert "bottleneck 6 (width 192 // reduction 32) is not a positive multiple of phm_dim 4; rounded up to 8" \
        in caplog.text
    assert model.blocks[0].mlp.adapter.down.out_features == 8


def test_the_adapter_is_the_references():
    """tanh-GELU (gelu_new) and Glorot-uniform factors with gain sqrt(2) (rabeehk/compacter)."""
    model = tiny_vit()
    torch.manual_seed(0)
    apply_compacter(model, phm_dim=4, reduction=16)
    adapter = model.blocks[0].mlp.adapter
    x = torch.randn(100)
    torch.testing.assert_close(adapter.act(x), F.gelu(x, approximate="tanh"))
    down = adapter.down  # s_i [out/n = 3, r = 1], t_i [in/n = 48, r = 1]: bound gain * sqrt(6 / (fan_in + fan_out))
    for factor, (fan_a, fan_b) in ((down.s, (3, 1)), (down.t, (48, 1))):
        bound = 2**0.5 * (6 / (fan_a + fan_b)) ** 0.5
        assert factor.abs().max() <= bound and factor.abs().max() > bound / 2**0.5


def test_wrapped_attention_passes_keyword_arguments_through():
    model = tiny_vit()
    apply_compacter(model, reduction=16)
    with torch.no_grad():
        model.blocks[0].attn.adapter.down.rule.normal_()
    attn, x = model.blocks[0].attn, torch.randn(2, 17, DIM)
    mask = torch.ones(17, 17, dtype=torch.bool).tril()
    with torch.no_grad():
        masked = attn(x, attn_mask=mask)
        torch.testing.assert_close(masked, attn.adapter(attn.base_layer(x, attn_mask=mask)))
        assert not torch.allclose(masked, attn(x), atol=1e-4)
        torch.testing.assert_close(attn(x, is_causal=True), masked)
        model.forward_features(images(2), attn_mask=torch.ones(17, 17, dtype=torch.bool))  # timm's call path


def test_save_load_round_trip(tmp_path):
    model = tiny_vit()
    names = apply_compacter(model, reduction=16, plus=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(images()), torch.arange(4)).backward()
        opt.step()
    model.eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
    save_compacter(model, tmp_path)
    fresh = tiny_vit()
    assert load_compacter(fresh, tmp_path) == names
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
