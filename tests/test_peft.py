"""PEFT interop: a LoRA or LoRA-GA timm model exported with ``export_peft`` loads with
``peft.PeftModel.from_pretrained`` onto the original timm model and computes the same logits; exported with its
backbone, the directory rebuilds that base model (the README's recipe, ``load_peft_export``)."""

import copy
import dataclasses
import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from inca.adapters.lora import apply_lora, lora_layers, merge_lora
from inca.adapters.lora_ga import init_lora_ga
from inca.adapters.peft_export import (
    BASE_RECORD_FILE,
    BASE_STATE_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    README_FILE,
    export_peft,
    load_peft_export,
)
from inca.errors import InCAError

from .conftest import TINY_ARGS, TINY_KWARGS, subset_task

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
    export_peft(model, tmp_path)  # no backbone: PEFT's two files, for a base model the caller builds
    assert sorted(p.name for p in tmp_path.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    config = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] is None
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


def lora_model(backbone, pool=None) -> nn.Module:
    """A LoRA model copied from ``backbone`` as inca-compare copies it, "trained" away from its init."""
    from inca.train.e2e import trainable_copy

    torch.manual_seed(0)
    model = trainable_copy(backbone, CLASSES, pool)
    apply_lora(model, rank=2, alpha=4)
    train_away(model)
    return model.eval()


def test_export_with_its_backbone_rebuilds_the_base_model(tmp_path, tiny_backbone):
    model = lora_model(tiny_backbone, pool="mean")
    export_peft(model, tmp_path, tiny_backbone, head_pool="mean")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, BASE_RECORD_FILE, BASE_STATE_FILE, README_FILE])
    assert json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"] == "vit_tiny_patch16_224"
    record = json.loads((tmp_path / BASE_RECORD_FILE).read_text())
    assert record == {"model_name": "vit_tiny_patch16_224", "model_kwargs": TINY_KWARGS, "weights": "random",
                      "weights_hash": tiny_backbone.weights_hash, "state_file": BASE_STATE_FILE,
                      "reset_classifier": {"num_classes": CLASSES, "global_pool": "avg"}}
    assert set(load_file(str(tmp_path / BASE_STATE_FILE))) == set(tiny_backbone.model.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(load_peft_export(tmp_path)(x), model(x), atol=1e-5, rtol=1e-5)


def test_export_of_hub_weights_names_their_repository_and_leaves_them_out(tmp_path, tiny_backbone):
    hub = dataclasses.replace(tiny_backbone, weights="pretrained")
    export_peft(lora_model(tiny_backbone), tmp_path, hub)
    name = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default tag of the name
    assert json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"] == name
    record = json.loads((tmp_path / BASE_RECORD_FILE).read_text())
    assert (record["weights"], record["state_file"]) == ("pretrained", None)
    assert not (tmp_path / BASE_STATE_FILE).exists()
    assert f"base_model: {name}" in (tmp_path / README_FILE).read_text()


def test_load_peft_export_refuses_what_would_not_rebuild_the_base(tmp_path, tiny_backbone):
    model = lora_model(tiny_backbone)
    export_peft(model, tmp_path / "bare")
    with pytest.raises(InCAError, match="exported without its backbone"):
        load_peft_export(tmp_path / "bare")
    with pytest.raises(InCAError, match="not a PEFT adapter directory"):
        load_peft_export(tmp_path / "nothing")
    export_peft(model, tmp_path / "full", tiny_backbone)
    record_path = tmp_path / "full" / BASE_RECORD_FILE
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "weights_hash": "0" * 16}))
    with pytest.raises(InCAError, match="weights hash"):
        load_peft_export(tmp_path / "full")
    (tmp_path / "full" / BASE_STATE_FILE).unlink()
    with pytest.raises(InCAError, match=f"lacks {BASE_STATE_FILE}"):
        load_peft_export(tmp_path / "full")


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_recipe() -> str:
    """The README's code that loads an export with timm, safetensors and PEFT alone (``DIR``: the export)."""
    section = README.read_text(encoding="utf-8").split("### Comparing methods", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.slow
def test_trained_lora_and_lora_ga_load_by_the_readme_recipe_in_a_fresh_interpreter(tmp_path, tiny_backbone):
    from inca.methods import RunConfig, get_method, train_e2e

    task = subset_task("synth-shapes", {"train": 32, "val": 16, "test": 16})
    settings = RunConfig(epochs=1, batch_size=16, progress=False)
    x = images(6)
    torch.save(x, tmp_path / "images.pt")
    recipe = readme_recipe()
    # LoRA's export computes what inca does; LoRA-GA's folds its base-weight shift into the base weights, which
    # rounds differently from subtracting it at run time: a few float32 ulps per block, up to about 1.5e-5 on these
    # logits (magnitude ~3). A wrong load differs by orders of magnitude more.
    tolerance = {"lora": 1e-5, "lora-ga": 5e-5}
    for name, hparams in (("lora", {}), ("lora-ga", {"init_batches": 1})):
        model, _ = train_e2e(name, tiny_backbone, task, hparams, settings)
        method, directory = get_method(name), tmp_path / name
        method.export(model, directory, tiny_backbone, method.make_config(hparams).head_pool)
        assert recipe in (directory / README_FILE).read_text()  # the export carries the README's recipe
        script = (f"DIR = {str(directory)!r}\n{recipe}\nimport torch\n\nwith torch.no_grad():\n"
                  f"    torch.save(model(torch.load({str(tmp_path / 'images.pt')!r})), {str(tmp_path / 'out.pt')!r})\n")
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                             env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Unexpected keyword" not in run.stderr  # nothing PEFT does not know in adapter_config.json
        with torch.no_grad():
            ours = model.eval()(x)
            torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ours, atol=tolerance[name], rtol=1e-5)
            torch.testing.assert_close(load_peft_export(directory)(x), ours, atol=tolerance[name], rtol=1e-5)
            # what the README used to say, timm's own random weights and head: another model entirely
            naive = timm.create_model("vit_tiny_patch16_224", num_classes=task.num_classes, **TINY_KWARGS)
            assert not torch.allclose(peft.PeftModel.from_pretrained(naive, directory).eval()(x), ours, atol=1e-2)


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
        # the export on its own scores what the comparison reported
        accuracy = evaluate(load_peft_export(directory), ImageBatches(task, backbone), "test", 64)
        assert accuracy == records[name]["test_acc"]
