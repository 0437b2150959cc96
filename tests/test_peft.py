"""PEFT interop: a LoRA or LoRA-GA timm model exported with ``export_peft`` loads with
``peft.PeftModel.from_pretrained`` onto the original timm model and computes the same logits."""

import copy
import functools
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from inca.adapters.lora import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, apply_lora, export_peft, lora_layers, merge_lora
from inca.adapters.lora_ga import init_lora_ga
from inca.errors import InCAError

from .conftest import TINY_ARGS, TINY_KWARGS

peft = pytest.importorskip("peft")

CLASSES = 5


@functools.cache
def _pretrained() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, **TINY_KWARGS).eval()


def original() -> nn.Module:
    """A fresh copy of the "pretrained" timm model, untouched."""
    return copy.deepcopy(_pretrained())


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def train_away(model: nn.Module) -> None:
    """Stand-in for training: B (and A, and the head) away from their initial values."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def load_with_peft(directory) -> nn.Module:
    return peft.PeftModel.from_pretrained(original(), directory).eval()


def assert_same_logits(model: nn.Module, directory) -> None:
    x = images()
    with torch.no_grad():
        ours, theirs = model.eval()(x), load_with_peft(directory)(x)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours, original()(x), atol=1e-3)  # the adapter really changes the output


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_export_loads_in_peft_with_equal_outputs(tmp_path, rslora):
    model = original()
    names = apply_lora(model, rank=4, alpha=8, target=r"blocks\.\d+\.(attn\.qkv|mlp\.fc2)", rslora=rslora,
                       dropout=0.1)
    train_away(model)
    export_peft(model, tmp_path, base_model_name_or_path="timm/vit_tiny_patch16_224")
    assert sorted(p.name for p in tmp_path.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    config = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, rslora)
    assert config["target_modules"] == names and config["modules_to_save"] == ["head"]
    keys = set(load_file(str(tmp_path / PEFT_WEIGHTS_FILE)))
    assert keys == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"} | {
        "base_model.model.head.weight", "base_model.model.head.bias"}  # fmt: skip
    assert_same_logits(model, tmp_path)

    merge_lora(model)  # a merged model exports the same adapter
    export_peft(model, tmp_path / "merged")
    assert_same_logits(model, tmp_path / "merged")


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("rslora", [True, False])
def test_lora_ga_exports_as_rank_2r_lora_of_the_original_weights(tmp_path, rslora):
    model = original()
    apply_lora(model, rank=2, alpha=16, rslora=rslora)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (4,), generator=g))]
    init_lora_ga(model, batches, loss_fn)
    train_away(model)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["use_rslora"] == rslora
    assert config["lora_alpha"] == pytest.approx(16 * math.sqrt(2) if rslora else 32)
    tensors = load_file(str(tmp_path / PEFT_WEIGHTS_FILE))
    layer = lora_layers(model)["blocks.0.attn.qkv"]
    A, B = (tensors[f"base_model.model.blocks.0.attn.qkv.lora_{ab}.weight"] for ab in "AB")
    assert torch.equal(A, torch.cat([layer.lora_A, layer.lora_A0])) and torch.equal(B[:, 2:], -layer.lora_B0)
    assert_same_logits(model, tmp_path)


def test_export_needs_lora_layers(tmp_path):
    with pytest.raises(InCAError, match="no LoRA layers to export"):
        export_peft(original(), tmp_path)


@pytest.mark.slow
def test_compare_exports_its_lora_models_for_peft(tmp_path):
    from inca.activations import ImageBatches
    from inca.backbone import create_backbone
    from inca.cli import compare_main
    from inca.suite import task_directory
    from inca.tasks import load_task
    from inca.train.e2e import evaluate

    out = tmp_path / "cmp"
    argv = [*TINY_ARGS, "--device", "cpu", "--tasks", "synth-shapes", "--epochs", "1", "--batch-size", "64",
            "--methods", "lora,lora-ga,linear", "--method-args", "lora-ga.init_batches=1", "--export-peft",
            "--out", str(out)]
    assert compare_main(argv) == 0
    records = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["results"]}
    assert "peft_dir" not in records["linear"]
    backbone = create_backbone("vit_tiny_patch16_224", "random", TINY_KWARGS)
    task = load_task("synth-shapes")
    for name in ("lora", "lora-ga"):
        directory = out / "runs" / task_directory(task) / name / "peft"
        assert records[name]["peft_dir"] == str(directory)
        base = copy.deepcopy(backbone.model)
        base.reset_classifier(task.num_classes)
        model = peft.PeftModel.from_pretrained(base, directory)
        # PEFT's model on the original backbone scores what the comparison reported
        assert evaluate(model, ImageBatches(task, backbone), "test", 64) == records[name]["test_acc"]
