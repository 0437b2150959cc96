import csv
import io
import json
import re

import numpy as np
import pytest
import torch

from inca.activations import CachedSource, LiveSource
from inca.adapters.inca import AdapterSpec, InCABank
from inca.adapters.saved import load_adapter
from inca.cache import build_cache
from inca.cli import predict_main, train_main
from inca.tasks import load_task
from inca.train.bank import train_bank
from inca.train.config import InCATrainConfig

from .conftest import TINY_ARGS


def test_cache_and_live_training_agree(tmp_path, tiny_backbone):
    task = load_task("synth-colour")
    specs = [AdapterSpec(layer=1, num_heads=3, lr=3e-3), AdapterSpec(layer=3, num_heads=3, lr=1e-3, seed=1)]
    cache = build_cache(tiny_backbone, task, [1, 3], tmp_path)
    sources = [CachedSource(cache, [1, 3]), LiveSource(tiny_backbone, task, [1, 3], round_to=torch.float16)]
    banks = []
    for source in sources:
        bank = InCABank(specs, tiny_backbone.width, task.num_classes)
        train_bank(bank, source, epochs=2, batch_size=64, seed=7, progress=False)
        banks.append(bank)
    for (name, a), (_, b) in zip(banks[0].state_dict().items(), banks[1].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert sources[1].forward_calls == 2 * -(-len(task.splits["train"]) // 64)


def test_grid_is_the_cross_product():
    options = InCATrainConfig(lr=[1e-3, 3e-4], queries=[1, 2], adapter_seeds=[0, 1])
    specs = options.grid([0, 5], default_heads=6)
    assert len(specs) == 2 * 2 * 2 * 2
    assert {s.num_heads for s in specs} == {6}
    assert len({(s.layer, s.lr, s.num_queries, s.seed) for s in specs}) == 16


def _run_train(tmp_path, *extra):
    out = tmp_path / "run"
    code = train_main([*TINY_ARGS, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra])
    return code, out


@pytest.mark.slow
def test_train_cli_end_to_end_and_predict(tmp_path, capsys):
    code, out = _run_train(tmp_path, "--tasks", "synth-colour,digits", "--layers", "last:2", "--lr", "3e-3,1e-3",
                           "--epochs", "2", "--ensemble", "3")
    assert code == 0
    printed = capsys.readouterr().out
    assert "| synth-colour" in printed and "| digits" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"synth-colour", "digits"}
    for result in results["tasks"].values():
        adapters = result["adapters"]
        assert len(adapters) == 4 and {a["layer"] for a in adapters} == {2, 3}
        val = [a["val_acc"] for a in adapters]
        assert result["best"]["index"] == int(np.argmax(val))  # selected on val, never test
        assert result["trainable_params"] > 0 and 0 < result["trainable_percent"] < 100
        assert result["activations"] == "cache"
        # --cache auto measured that a store beats streaming for 2 epochs; the small store is held in memory
        assert result["cache_decision"]["choice"] == "build" and result["cache_decision"]["rates"]["backbone_images"]
        assert result["cache_dtype"] == "float16" and result["cache_device"] == "cpu"
        ensemble = result["ensemble"]
        assert ensemble["k"] == 3 and ensemble["members"] == sorted(range(4), key=lambda i: (-val[i], i))[:3]
        assert load_adapter(ensemble["adapter_dir"]).layers == [adapters[i]["layer"] for i in ensemble["members"]]
    assert "ens. test acc" in (out / "results.md").read_text()
    assert (out / "results.md").read_text().startswith("# InCA results")
    assert not list(out.rglob("checkpoint.safetensors"))

    # Predict the test split of synth-colour from PNG files: accuracy matches the reported one.
    task = load_task("synth-colour")
    test = task.splits["test"]
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for i in range(len(test)):
        test.image(i).save(image_dir / f"{i:04d}.png")
    # Both tasks from one backbone pass: synth-colour's single best adapter and its ensemble, and digits'.
    colour, digits = results["tasks"]["synth-colour"], results["tasks"]["digits"]
    adapters = [f"colour={colour['best']['adapter_dir']}", f"colour-ensemble={colour['ensemble']['adapter_dir']}",
                f"digits={digits['best']['adapter_dir']}"]
    assert predict_main([arg for a in adapters for arg in ("--adapter", a)] + ["--images", str(image_dir)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(test) and all(row["digits"] for row in rows)
    for column, reported in (("colour", results["tasks"]["synth-colour"]["test_acc"]),
                             ("colour-ensemble", results["tasks"]["synth-colour"]["ensemble"]["test_acc"])):
        accuracy = np.mean([task.classes.index(row[column]) == y for row, y in zip(rows, test.labels)])
        assert abs(accuracy - reported) <= 2 / len(test), column


@pytest.mark.slow
def test_rerun_skips_finished_tasks(tmp_path, capsys, caplog):
    args = ("--tasks", "synth-colour", "--layers", "-1", "--epochs", "1", "--cache", "never")
    assert _run_train(tmp_path, *args)[0] == 0
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    assert first["tasks"]["synth-colour"]["activations"] == "live"
    with caplog.at_level("INFO"):
        assert _run_train(tmp_path, *args)[0] == 0
    assert "finished in an earlier run, skipped" in caplog.text
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == first


@pytest.mark.slow
def test_recipe_with_flag_override(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tasks: [synth-colour]\nlayers: '0'\nlr: [1e-3]\nepochs: 3\ncache: never\n")
    code, out = _run_train(tmp_path, "--recipe", str(recipe), "--epochs", "1")
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["epochs"] == 1 and result["config"]["layers"] == "0"


def _one_line_error(capsys, pattern):
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines are progress bars
    assert last.startswith("inca-") and "Traceback" not in err, err
    assert re.search(pattern, last), last


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ((), "no tasks given"),
        (("--tasks", "digits", "--layers", "12"), "layer 12 is out of range.*0\\.\\.3"),
        (("--tasks", "digits", "--layers", "best:2"), "needs --probe-report"),
        (("--tasks", "digits", "--lr", "0"), "--lr: expected a finite number > 0"),
        (("--tasks", "nope"), "unknown task spec"),
    ],
)
def test_train_bad_input(tmp_path, capsys, extra, pattern):
    assert _run_train(tmp_path, *extra)[0] == 2
    _one_line_error(capsys, pattern)


@pytest.mark.slow
def test_recipe_unknown_keys_are_named(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tasks: [digits]\nlearning_rate: 1e-3\nepoch: 2\n")
    assert _run_train(tmp_path, "--recipe", str(recipe))[0] == 2
    _one_line_error(capsys, "unknown keys epoch, learning_rate")


@pytest.mark.slow
def test_all_diverged_is_one_line(tmp_path, capsys):
    code, _ = _run_train(tmp_path, "--tasks", "synth-colour", "--layers", "-1", "--epochs", "1", "--lr", "1e30")
    assert code == 2
    _one_line_error(capsys, "all 1 adapters diverged; lower the learning rates \\(--lr\\) and train again")
    code, out = _run_train(tmp_path, "--tasks", "synth-colour", "--layers", "-1", "--epochs", "1", "--lr", "1e-3")
    assert code == 0  # the advice works as written: nothing the diverged run left blocks the changed run
    assert not list(out.rglob("checkpoint.safetensors"))


@pytest.mark.slow
def test_finished_tasks_survive_a_later_failure(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import inca.training

    for cls in ("a", "b"):
        for i in range(6):
            (tmp_path / "imgs" / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "imgs" / "b" / "5.jpg")
    train = inca.training.train_inca_task

    def cut_then_train(backbone, task, *args, **kwargs):
        """Every image is checked before training starts: this one is cut in half after that, while the first
        task trains, so the second task fails late. What must survive is the first task's finished result."""
        if task.spec.startswith("folder:"):
            data = (tmp_path / "imgs" / "b" / "5.jpg").read_bytes()
            (tmp_path / "imgs" / "b" / "5.jpg").write_bytes(data[: len(data) // 2])
        return train(backbone, task, *args, **kwargs)

    monkeypatch.setattr(inca.training, "train_inca_task", cut_then_train)
    code, out = _run_train(tmp_path, "--tasks", f"synth-colour,folder:{tmp_path / 'imgs'}", "--layers", "-1",
                           "--epochs", "1", "--num-workers", "0")
    assert code == 2
    _one_line_error(capsys, "cannot read image .*5.jpg")
    assert set(json.loads((out / "results.json").read_text())["tasks"]) == {"synth-colour"}


@pytest.mark.slow
def test_other_configuration_needs_overwrite(tmp_path, capsys):
    args = ("--tasks", "synth-colour", "--layers", "-1", "--epochs", "1")
    assert _run_train(tmp_path, *args)[0] == 0
    assert _run_train(tmp_path, *args, "--lr", "3e-3")[0] == 2
    _one_line_error(capsys, "results of another configuration.*--overwrite")
    assert _run_train(tmp_path, *args, "--lr", "3e-3", "--overwrite")[0] == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["lr"] == [3e-3]


@pytest.mark.slow
def test_predict_refuses_other_backbone_weights(tmp_path, capsys):
    from safetensors.torch import save_file

    assert _run_train(tmp_path, "--tasks", "synth-colour", "--layers", "-1", "--epochs", "1")[0] == 0
    import timm

    other = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=4)
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    image = tmp_path / "x.png"
    load_task("synth-colour").splits["test"].image(0).save(image)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    adapter = results["tasks"]["synth-colour"]["best"]["adapter_dir"]
    assert predict_main(["--adapter", adapter, "--images", str(image),
                         "--weights", str(tmp_path / "other.safetensors")]) == 2
    _one_line_error(capsys, "trained on vit_tiny_patch16_224 with other weights")
    assert predict_main(["--adapter", str(tmp_path), "--images", str(image)]) == 2
    _one_line_error(capsys, "holds no saved adapter")
