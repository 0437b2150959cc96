"""tools/pretrain_proxy.py: formula-driven images, deterministic from a seed, and weights inca loads."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inca.backbone import create_backbone
from tests.conftest import load_tool

TOOL = Path(__file__).parents[1] / "tools" / "pretrain_proxy.py"


@pytest.fixture(scope="module")
def proxy():
    return load_tool("pretrain_proxy")


def test_every_family_draws_distinct_classes_deterministically_from_the_seed(proxy):
    counts = {"fractals": 2, "contours": 2, "textures": 2, "leaves": 2}
    images, labels = proxy.make_dataset(counts, 4, seed=0)
    assert images.shape == (32, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [c for c in range(8) for _ in range(4)]
    again, _ = proxy.make_dataset(counts, 4, seed=0)
    other, _ = proxy.make_dataset(counts, 4, seed=1)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    means = images.reshape(8, 4, -1).astype(float).mean(1)
    assert all(np.abs(means[a] - means[b]).mean() > 1 for a in range(8) for b in range(a))  # classes differ
    assert images.std() > 20  # not blank


def test_views_are_seeded_crops_of_the_same_size(proxy):
    images = torch.rand(4, 3, 32, 32)
    views = [proxy.random_views(images, torch.Generator().manual_seed(s), grey_share=0.5) for s in (0, 0, 1)]
    assert views[0].shape == images.shape and torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])


@pytest.mark.parametrize("share", ["-0.1", "1.5"])
def test_grey_share_outside_0_1_exits_2(proxy, monkeypatch, share):
    monkeypatch.setattr(sys, "argv", ["pretrain_proxy.py", "--out", "unused", "--grey-share", share])
    with pytest.raises(SystemExit) as exit_:
        proxy.parse_args()
    assert exit_.value.code == 2


@pytest.mark.slow
def test_a_short_run_writes_weights_inca_loads(tmp_path):
    out = tmp_path / "proxy"
    args = ["--out", str(out), "--steps", "3", "--warmup-steps", "2", "--fractals", "2", "--contours", "1",
            "--textures", "1", "--leaves", "1", "--per-class", "8", "--batch-size", "8", "--depth", "2"]
    done = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "vit_tiny_patch16_224"
    assert config["model_kwargs"] == {"img_size": 32, "patch_size": 8, "depth": 2}
    assert config["pretraining"]["steps"] == 3 and config["pretraining"]["finished"]
    assert f"--weights {out / 'model.safetensors'}" in done.stdout
    backbone = create_backbone(config["backbone"], str(out / "model.safetensors"), config["model_kwargs"])
    random = create_backbone(config["backbone"], "random", config["model_kwargs"])
    assert backbone.weights_hash != random.weights_hash and backbone.num_blocks == 2


def test_reconstruction_targets_are_the_pixels_each_patch_token_embeds(proxy):
    """The tool's reconstruction targets line up with timm's patch tokens, token by token."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    targets = proxy.patch_pixels(x, 8)
    assert targets.shape == (2, 16, 3 * 8 * 8)
    conv = model.patch_embed.proj
    embedded = targets @ conv.weight.reshape(conv.out_channels, -1).t() + conv.bias
    assert torch.allclose(model.patch_embed(x), embedded, atol=1e-5)
