import pytest
import timm
import torch
from safetensors.torch import save_file

from inca.backbone import create_backbone, parse_model_kwargs, resolve_layers
from inca.errors import InCAError

from .conftest import TINY_KWARGS


def test_extract_equals_forward_intermediates(tiny_backbone):
    images = torch.randn(3, 3, 32, 32)
    tokens = tiny_backbone.extract(images, [3, 0, 2])
    assert sorted(tokens) == [0, 2, 3]
    # Independent reference: run the blocks by hand.
    model = tiny_backbone.model
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for i, block in enumerate(model.blocks):
            x = block(x)
            if i in tokens:
                torch.testing.assert_close(tokens[i], x, rtol=1e-5, atol=1e-5)
    assert tokens[0].shape == (3, tiny_backbone.num_tokens, tiny_backbone.width)


def test_extract_keeps_prefix_tokens_first(tiny_backbone):
    images = torch.randn(2, 3, 32, 32)
    spatial, prefix = tiny_backbone.model.forward_intermediates(
        images, indices=[1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )[0]
    tokens = tiny_backbone.extract(images, [1])[1]
    assert torch.equal(tokens[:, :1], prefix) and torch.equal(tokens[:, 1:], spatial)
    assert tiny_backbone.token_layout == {
        "num_prefix_tokens": 1, "cls_token": True, "num_register_tokens": 0, "grid_size": [4, 4], "num_tokens": 17,
    }


def test_register_tokens_are_kept():
    backbone = create_backbone("vit_tiny_patch16_224", "random", {**TINY_KWARGS, "reg_tokens": 2})
    tokens = backbone.extract(torch.randn(1, 3, 32, 32), [-1])
    assert tokens[3].shape[1] == 3 + 16
    assert backbone.token_layout["num_register_tokens"] == 2


def test_preprocessing_follows_built_model(tiny_backbone):
    assert tiny_backbone.data_config["input_size"] == (3, 32, 32)
    assert tiny_backbone.transform.transforms[1].size == (32, 32)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("all", [0, 1, 2, 3]), ("-1", [3]), ("0,2", [0, 2]), ("last:2", [2, 3]), ("-4,-1,1", [0, 1, 3]), (2, [2])],
)
def test_layer_specs(spec, expected):
    assert resolve_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", ["4", "-5", "0,9", "last:0", "last:5", "abc", ""])
def test_bad_layer_specs(spec):
    with pytest.raises(InCAError) as info:
        resolve_layers(spec, 4)
    assert "\n" not in str(info.value)


def test_out_of_range_names_valid_range():
    with pytest.raises(InCAError, match=r"0\.\.3"):
        resolve_layers("7", 4)


def test_model_kwargs_parsing():
    assert parse_model_kwargs(["img_size=32", "drop_rate=0.1", "class_token=false", "name=x"]) == {
        "img_size": 32, "drop_rate": 0.1, "class_token": False, "name": "x"}
    with pytest.raises(InCAError, match="key=value"):
        parse_model_kwargs(["img_size"])


def test_random_weights_are_reproducible(tiny_backbone):
    again = create_backbone("vit_tiny_patch16_224", "random", TINY_KWARGS)
    assert again.weights_hash == tiny_backbone.weights_hash
    assert again.fingerprint == tiny_backbone.fingerprint


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file(tmp_path, tiny_backbone, suffix):
    torch.manual_seed(123)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KWARGS)  # head is ignored
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    backbone = create_backbone("vit_tiny_patch16_224", str(path), TINY_KWARGS)
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, state[key])
    assert backbone.weights_hash != tiny_backbone.weights_hash
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training


def test_weights_file_that_does_not_fit(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_KWARGS).state_dict(), path)
    with pytest.raises(InCAError, match="do not fit|cannot load"):
        create_backbone("vit_small_patch16_224", str(path), TINY_KWARGS)


def test_pickle_checkpoints_are_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": object()}}, path)  # not loadable with weights_only=True
    with pytest.raises(InCAError, match="cannot load weights"):
        create_backbone("vit_tiny_patch16_224", str(path), TINY_KWARGS)


@pytest.mark.parametrize(
    ("name", "weights", "message"),
    [
        ("vit_tiny_patch16", "random", "did you mean.*vit_tiny_patch16_224"),
        ("resnet18", "random", "not a ViT-family"),
        ("vit_tiny_patch16_224", "missing.safetensors", "does not exist"),
        ("vit_tiny_patch16_224", "weights.txt", "neither pretrained, random nor a weights file"),
        ("vit_tiny_patch16_224", "pretrained", "not in the local cache.*Hugging Face cache.*--weights random"),
    ],
)
def test_bad_backbones(name, weights, message):
    with pytest.raises(InCAError, match=message) as info:
        create_backbone(name, weights, TINY_KWARGS if name.startswith("vit") else None)
    assert "\n" not in str(info.value)


def test_bad_model_kwargs():
    with pytest.raises(InCAError, match="cannot be built with --model-kwargs"):
        create_backbone("vit_tiny_patch16_224", "random", {"no_such_arg": 1})
