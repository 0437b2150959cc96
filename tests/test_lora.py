import copy
import functools
import json
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from inca.adapters.common import CONFIG_FILE, WEIGHTS_FILE, count_parameters
from inca.adapters.lora import (
    LoRALinear,
    apply_lora,
    load_lora,
    lora_layers,
    mark_lora_trainable,
    merge_lora,
    save_lora,
    unmerge_lora,
)
from inca.errors import InCAError

SUBLAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@functools.cache
def _backbone(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4, num_classes=num_classes
    ).eval()


def tiny_vit(num_classes: int = 10) -> nn.Module:
    """A fresh copy of one random backbone: "the same base weights" in the round-trip tests."""
    return copy.deepcopy(_backbone(num_classes))


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomise_b(model: nn.Module) -> None:
    """Stand-in for training B away from zero."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05)


def train_steps(model: nn.Module, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def test_apply_wraps_default_targets_with_peft_shapes_and_scaling():
    model = tiny_vit()
    backbone_keys = set(model.state_dict())
    names = apply_lora(model, rank=4, alpha=16)
    assert names == [f"blocks.{i}.{s}" for i in range(4) for s in SUBLAYERS]
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear) and isinstance(layer, nn.Linear)
        assert layer.lora_A.shape == (4, layer.in_features)
        assert layer.lora_B.shape == (layer.out_features, 4)
        assert not layer.lora_B.any() and layer.lora_A.abs().sum() > 0
        assert layer.scaling == 16 / 4
        assert not layer.weight.requires_grad
    # The base weights stay where they were: backbone checkpoints still load by name.
    extra = set(model.state_dict()) - backbone_keys
    assert backbone_keys <= set(model.state_dict())
    assert extra == {f"{n}.lora_{ab}" for n in names for ab in "AB"}

    rs = tiny_vit()
    apply_lora(rs, rank=4, alpha=16, rslora=True)
    assert rs.blocks[0].attn.qkv.scaling == 16 / math.sqrt(4)


def test_zero_b_at_init_leaves_outputs_unchanged():
    base, model = tiny_vit(), tiny_vit()
    apply_lora(model, rank=8)
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_merged_forward_equals_unmerged_and_skips_the_branch():
    model = tiny_vit()
    apply_lora(model, rank=4, alpha=8)
    randomise_b(model)
    x = images()
    original = {n: l.weight.detach().clone() for n, l in lora_layers(model).items()}
    with torch.no_grad():
        unmerged = model(x)
    assert not torch.allclose(unmerged, tiny_vit()(x), atol=1e-3)  # B really changes the output

    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    merged.sum().backward()  # the merged forward never touches lora_A / lora_B
    assert all(layer.lora_A.grad is None and layer.lora_B.grad is None for layer in lora_layers(model).values())

    merge_lora(model)  # idempotent
    unmerge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.weight, original[name], atol=1e-6, rtol=0)


def test_only_lora_params_and_head_get_gradients():
    model = tiny_vit()
    apply_lora(model, rank=4)
    randomise_b(model)  # so lora_A gets a non-zero gradient too
    F.cross_entropy(model(images()), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        trainable = ".lora_" in name or name.startswith("head.")
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
        if trainable:
            assert p.grad.abs().sum() > 0, name

    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    head = sum(p.numel() for p in model.head.parameters())
    count = count_parameters(model)
    assert count.trainable == lora + head
    assert count.total == sum(p.numel() for p in tiny_vit().parameters()) + lora

    mark_lora_trainable(model, train_head=False)
    assert not any(p.requires_grad for p in model.head.parameters())


def test_dropout_only_on_the_lora_branch():
    model = tiny_vit()
    apply_lora(model, rank=4, dropout=0.5)
    x = images()
    model.train()
    with torch.no_grad():  # B = 0: the base path is never dropped
        assert torch.equal(model(x), tiny_vit().train()(x))
    randomise_b(model)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_regex_matching_nothing_is_an_error_naming_it():
    model = tiny_vit()
    with pytest.raises(InCAError, match=re.escape(r"'blocks\.\d+\.attn\.qkvz' matches no module")):
        apply_lora(model, target=r"blocks\.\d+\.attn\.qkvz")
    with pytest.raises(InCAError, match="invalid"):
        apply_lora(model, target="blocks.(")
    assert not lora_layers(model)


def test_regex_matching_a_conv_is_an_error_naming_it():
    model = tiny_vit()
    with pytest.raises(InCAError, match=r"'patch_embed\.proj', a Conv2d"):
        apply_lora(model, target=r".*proj")
    assert not lora_layers(model)  # nothing half-applied


def test_bad_arguments_and_double_application():
    model = tiny_vit()
    with pytest.raises(InCAError, match="rank"):
        apply_lora(model, rank=0)
    with pytest.raises(InCAError, match="dropout"):
        apply_lora(model, dropout=1.0)
    with pytest.raises(InCAError, match="apply_lora"):
        mark_lora_trainable(model)
    apply_lora(model)
    with pytest.raises(InCAError, match="already has LoRA"):
        apply_lora(model)


def test_save_load_round_trip_onto_fresh_backbone(tmp_path):
    model = tiny_vit()
    names = apply_lora(model, rank=4, alpha=8, target=r"blocks\.\d+\.(attn\.qkv|mlp\.fc2)", rslora=True)
    train_steps(model)
    x = images()
    with torch.no_grad():
        expected = model(x)

    save_lora(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert set(saved) == {f"{n}.lora_{ab}" for n in names for ab in "AB"} | {"head.weight", "head.bias"}
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (config["rank"], config["alpha"], config["rslora"], config["wrapped"]) == (4, 8, True, names)

    fresh = tiny_vit()
    assert load_lora(fresh, tmp_path) == names
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)

    merge_lora(model)  # saving a merged model stores the same adapter
    save_lora(model, tmp_path / "merged")
    again = tiny_vit()
    load_lora(again, tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(again(x), expected)


def test_load_rejects_wrong_model_or_corrupt_files(tmp_path):
    model = tiny_vit()
    apply_lora(model, rank=2)
    save_lora(model, tmp_path)
    with pytest.raises(InCAError, match="head"):
        load_lora(tiny_vit(num_classes=5), tmp_path)
    with open(tmp_path / WEIGHTS_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(InCAError, match="does not match"):
        load_lora(tiny_vit(), tmp_path)
    with pytest.raises(InCAError, match="not a saved adapter"):
        load_lora(tiny_vit(), tmp_path / "missing")
