import copy
import functools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from inca.adapters.lora import apply_lora, load_lora, lora_layers, save_lora
from inca.adapters.lora_ga import DIRECTIONS, SCALES, estimate_gradients, init_lora_ga
from inca.errors import InCAError

RANK = 2


@functools.cache
def _backbone(img_size: int) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, depth=4, num_classes=10
    ).eval()


def tiny_vit(img_size: int = 32) -> nn.Module:
    return copy.deepcopy(_backbone(img_size))


def make_batches(n: int, batch_size: int, img_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(batch_size, 3, img_size, img_size, generator=g),
            torch.randint(0, 10, (batch_size,), generator=g),
        )
        for _ in range(n)
    ]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def full_gradients(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Reference: plain backward on the un-adapted model, weight gradients averaged over the batches."""
    model = copy.deepcopy(model)
    total: dict[str, torch.Tensor] = {}
    for batch in batches:
        model.zero_grad()
        loss_fn(model, batch).backward()
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("blocks."):
                total[name] = total.get(name, 0) + m.weight.grad
    return {name: g / len(batches) for name, g in total.items()}


def stable_factor(d_out: int, gamma: float) -> float:
    return d_out**0.25 / math.sqrt(gamma)


def test_output_unchanged_flags_restored_and_no_grads_left():
    base, model = tiny_vit(), tiny_vit()
    apply_lora(model, rank=RANK, rslora=True)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    x = torch.randn(4, 3, 32, 32)
    init_lora_ga(model, make_batches(2, 4), loss_fn)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-4, rtol=1e-4)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for name, layer in lora_layers(model).items():
        assert layer.lora_B.abs().sum() > 0, name
        assert not torch.equal(layer.weight, base.get_submodule(name).weight), name  # W0 was shifted


def test_estimated_gradient_is_the_full_gradient_averaged_over_batches():
    base, model = tiny_vit(), tiny_vit()
    apply_lora(model, rank=RANK)
    batches = make_batches(3, 2)
    grads = estimate_gradients(model, lora_layers(model), batches, loss_fn)
    reference = full_gradients(base, batches)
    assert grads.keys() == reference.keys()
    for name, g in grads.items():
        assert g.device.type == "cpu" and g.dtype == torch.float32
        torch.testing.assert_close(g, reference[name], atol=1e-6, rtol=1e-4)


def test_directions_are_the_singular_subspaces_of_the_full_gradient():
    # 8x8 images with 8x8 patches give 2 tokens per image; 4 one-image batches make every gradient rank <= 8
    # = q = 4r, where the randomised SVD is exact and the top-2r singular values are well separated.
    img, gamma = 8, 9.0
    base, model = tiny_vit(img), tiny_vit(img)
    apply_lora(model, rank=RANK, rslora=True)
    batches = make_batches(4, 1, img)
    init_lora_ga(model, batches, loss_fn, gamma=gamma)
    reference = full_gradients(base, batches)
    for name, layer in lora_layers(model).items():
        U, S, Vh = torch.linalg.svd(reference[name].double())
        # rank <= q (so the randomised SVD is exact) and separated singular values at r and 2r
        assert S[4 * RANK] < 1e-5 * S[0], name
        assert S[RANK] < 0.98 * S[RANK - 1] and S[2 * RANK] < 0.95 * S[2 * RANK - 1], name
        factor = stable_factor(layer.out_features, gamma)
        A, B = layer.lora_A.double() / factor, layer.lora_B.double() / factor
        # "stable" scale: unit-norm singular vectors times d_out^(1/4)/sqrt(gamma)
        torch.testing.assert_close(A @ A.T, torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(B.T @ B, torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
        # ArB2r: row space of A = top-r right singular vectors; columns of B = left singular vectors r+1..2r
        V_top, U_next = Vh[:RANK].T, U[:, RANK : 2 * RANK]
        torch.testing.assert_close(A.T @ A, V_top @ V_top.T, atol=1e-3, rtol=0)
        torch.testing.assert_close(B @ B.T, U_next @ U_next.T, atol=1e-3, rtol=0)
        # and the base weight absorbed exactly -s * B A (fp32)
        shift = layer.scaling * (layer.lora_B @ layer.lora_A)
        torch.testing.assert_close(layer.weight, base.get_submodule(name).weight - shift, atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("scale", SCALES)
def test_every_direction_and_scale_keeps_the_output(direction, scale):
    base, model = tiny_vit(), tiny_vit()
    apply_lora(model, rank=RANK)
    init_lora_ga(model, make_batches(1, 2), loss_fn, direction=direction, scale=scale)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-4, rtol=1e-4)
    layer = model.blocks[0].attn.qkv
    gram = layer.lora_A @ layer.lora_A.T  # rows are scaled orthonormal singular vectors in every variant
    torch.testing.assert_close(gram, gram[0, 0] * torch.eye(RANK), atol=1e-5, rtol=1e-4)


def test_initialisation_is_deterministic():
    batches = make_batches(2, 2)
    a, b = tiny_vit(), tiny_vit()
    for model in (a, b):
        apply_lora(model, rank=RANK)
        with torch.no_grad():  # different random lora_A draws must not matter
            for layer in lora_layers(model).values():
                layer.lora_A.normal_()
        init_lora_ga(model, batches, loss_fn)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_save_load_reproduces_the_trained_model_exactly(tmp_path):
    model = tiny_vit()
    apply_lora(model, rank=RANK, alpha=16, rslora=True)
    init_lora_ga(model, make_batches(2, 4), loss_fn)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for batch in make_batches(3, 4):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)

    save_lora(model, tmp_path)
    fresh = tiny_vit()  # the original backbone: W0, not the shifted weight
    load_lora(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    for name, layer in lora_layers(fresh).items():
        assert torch.equal(layer.weight, model.get_submodule(name).weight), name


def test_bad_use_is_a_clear_error():
    model = tiny_vit()
    with pytest.raises(InCAError, match="apply_lora"):
        init_lora_ga(model, make_batches(1, 2), loss_fn)
    apply_lora(model, rank=RANK)
    with pytest.raises(InCAError, match="direction"):
        init_lora_ga(model, make_batches(1, 2), loss_fn, direction="BrAr")
    with pytest.raises(InCAError, match="scale"):
        init_lora_ga(model, make_batches(1, 2), loss_fn, scale="huge")
    with pytest.raises(InCAError, match="at least one batch"):
        init_lora_ga(model, [], loss_fn)
    assert all(p.grad is None for p in model.parameters())
    init_lora_ga(model, make_batches(1, 2), loss_fn)
    with pytest.raises(InCAError, match="not fresh"):
        init_lora_ga(model, make_batches(1, 2), loss_fn)


def test_the_gradient_is_estimated_in_train_mode_and_the_mode_restored():
    """As the authors' estimate_gradient and PEFT's LoRA-GA (both call model.train())."""
    model = tiny_vit()
    apply_lora(model, rank=RANK)
    modes = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.eval()
    estimate_gradients(model, lora_layers(model), make_batches(2, 2), loss_fn)
    assert modes == [True, True] and not any(m.training for m in model.modules())


def test_a_zero_gradient_is_a_clear_error():
    model = tiny_vit()
    with torch.no_grad():
        model.head.weight.zero_()  # a zero head sends no gradient back into the blocks
    apply_lora(model, rank=RANK)
    with pytest.raises(InCAError, match="zero-initialised head"):
        init_lora_ga(model, make_batches(1, 2), loss_fn)
