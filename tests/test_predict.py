"""inca-predict over whole runs: ``--run`` of inca-train (best adapters, or the ensembles it offers) and of
inca-compare (every method's saved model: InCA adapters beside end-to-end models, served as they were trained),
several ``--adapter`` paths after one flag, distinct columns for one task's several models, and the exit code when
an image cannot be read."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import inca.adapters.common
import inca.tasks
from inca.activations import ImageBatches
from inca.cli import compare_main, predict_main, train_main
from inca.inference import MultiTaskInCA, column_names
from inca.methods import RunConfig
from inca.methods.run import train_e2e
from inca.prediction import adapter_paths
from inca.tasks import SPLITS, Task

from .conftest import TINY_ARGS

SIZES = {"train": 48, "val": 16, "test": 16}


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks cut to a few batches (the commands load them through here)."""
    real = inca.tasks.load_task

    def load_small(spec, *args, **kwargs):
        task = real(spec, *args, **kwargs)
        return Task(task.spec, task.classes, {name: task.splits[name].subset(np.arange(SIZES[name]))
                                              for name in SPLITS}, task.identity)

    monkeypatch.setattr(inca.tasks, "load_task", load_small)


def test_several_models_of_one_task_get_distinct_columns(caplog):
    with caplog.at_level(logging.INFO, logger="inca"):
        names = column_names(["a/t-1/adapter", "b/t-1/adapter", "a/t-1/ensemble", "a/u/adapter", "c/t/model"],
                             [{"task": "t"}, {"task": "t"}, {"task": "t"}, {"task": "u"}, {"task": "v"}],
                             ["inca", "inca", "inca", "inca", "lora"])
    assert names == ["t@a/adapter", "t@b/adapter", "t@a/ensemble", "u", "v"]
    assert "3 saved models of task t" in caplog.text
    assert column_names(["x/adapter", "y/adapter"], [{"task": "t"}] * 2, ["lora", "full"]) == ["t@lora", "t@full"]
    assert column_names(["x/adapter", "x/adapter"], [{"task": "t"}] * 2, ["inca"] * 2) == ["t@1", "t@2"]


def test_a_folder_task_s_column_is_its_folder_s_name():
    """A folder task records its absolute path; its column is the folder's name, unless two tasks share it."""
    pets = [{"task": "folder:/data/pets"}]
    assert column_names(["x/adapter", "y/adapter"], pets * 2, ["inca", "lora"]) == ["pets@inca", "pets@lora"]
    assert column_names(["x/adapter", "y/adapter"], [*pets, {"task": "digits"}], ["inca"] * 2) == ["pets", "digits"]
    assert column_names(["x/adapter", "y/adapter"], [*pets, {"task": "folder:/other/pets"}], ["inca"] * 2) == [
        "folder:/data/pets", "folder:/other/pets"]


@pytest.mark.slow
def test_compare_saves_every_model_and_predict_serves_them_as_trained(tmp_path, small_tasks, tiny_backbone, capsys,
                                                                     monkeypatch):
    out = tmp_path / "cmp"
    assert compare_main([*TINY_ARGS, "--device", "cpu", "--tasks", "synth-shapes", "--epochs", "1", "--batch-size",
                         "16", "--methods", "inca,lora,linear", "--method-args", "linear.pool=mean", "inca.layers=-1",
                         "--out", str(out)]) == 0
    records = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["results"]}
    # One call serves an InCA adapter (on the shared pass) beside two end-to-end models, a column each.
    reads, read = [], inca.adapters.common.read_json_file  # each config read once: loader, column and load share it
    monkeypatch.setattr(inca.adapters.common, "read_json_file", lambda path, *a: reads.append(path) or read(path, *a))
    model = MultiTaskInCA.from_saved([out / r["adapter_dir"] for r in records.values()])
    assert sorted(reads) == sorted(out / r["adapter_dir"] / "adapter_config.json" for r in records.values())
    assert model.tasks == ["synth-shapes@inca", "synth-shapes@lora", "synth-shapes@linear"]
    task = inca.tasks.load_task("synth-shapes")
    images, labels = next(iter(ImageBatches(task, tiny_backbone).loader("test", [np.arange(SIZES["test"])])))
    with torch.no_grad():
        served = model(images)
    for method, record in records.items():  # compare's test accuracy, reproduced by the saved model
        predicted = served[f"synth-shapes@{method}"].argmax(-1)
        assert (predicted == labels).float().mean().item() == pytest.approx(record["test_acc"], abs=1e-9), method
    # The logits equal those of the model trained again in this process under the same settings.
    for method, hparams in (("lora", {}), ("linear", {"pool": "mean"})):
        trained, _ = train_e2e(method, tiny_backbone, task, hparams, RunConfig(epochs=1, batch_size=16, progress=False))
        with torch.no_grad():
            expected = trained.eval()(images)
        torch.testing.assert_close(served[f"synth-shapes@{method}"], expected, atol=1e-5, rtol=0)

    image = tmp_path / "x.png"
    task.splits["test"].image(0).save(image)
    capsys.readouterr()
    assert predict_main(["--run", str(out), "--images", str(image), "--device", "cpu"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert header[1::2] == [f"synth-shapes@{method}" for method in records]


@pytest.mark.slow
def test_predict_serves_a_training_run(tmp_path, small_tasks, capsys, caplog):
    out = tmp_path / "run"
    assert train_main([*TINY_ARGS, "--tasks", "synth-colour,synth-shapes", "--layers", "-1", "--lr", "1e-3,3e-2",
                       "--epochs", "1", "--ensemble", "2", "--out", str(out), "--cache", "never"]) == 0
    results = json.loads((out / "results.json").read_text())["tasks"]
    images = tmp_path / "images"
    images.mkdir()
    test = inca.tasks.load_task("synth-colour").splits["test"]
    for i in range(3):
        test.image(i).save(images / f"{i}.png")
    (images / "9.png").write_bytes(b"not an image")
    capsys.readouterr()

    def predicted(*argv: str) -> tuple[int, list[str]]:
        """The exit code and the task columns of one inca-predict call on the images."""
        code = predict_main([*argv, "--images", str(images), "--device", "cpu"])
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1 + 3  # the header and each readable image
        return code, lines[0].split(",")[1::2]

    tasks = ["synth-colour", "synth-shapes"]
    assert predicted("--run", str(out)) == (1, tasks)  # 1: an image was skipped, the others' rows written
    with caplog.at_level(logging.INFO, logger="inca"):
        assert predicted("--adapter", str(out)) == (1, tasks)
    assert f"serving it as --run {out}" in caplog.text
    globbed = sorted(str(path) for path in out.glob("*/adapter"))
    assert predicted("--adapter", *globbed) == (1, tasks)
    (images / "9.png").unlink()
    assert predicted("--adapter", globbed[0], "--adapter", globbed[1]) == (0, tasks)

    # --use ensemble: each task's ensemble where it is better on val than the best adapter, else that adapter.
    task_dirs = [out / Path(r["best"]["adapter_dir"]).parent.name for r in results.values()]
    offered = [r["ensemble"]["val_acc"] > r["val_acc"] for r in results.values()]
    assert adapter_paths([], [str(out)], "ensemble") == [
        str(directory / ("ensemble" if better else "adapter")) for directory, better in zip(task_dirs, offered)]
    assert adapter_paths([], [str(out)]) == [str(directory / "adapter") for directory in task_dirs]
    report = json.loads((out / "results.json").read_text())
    report["tasks"]["synth-colour"]["serve"] = "ensemble"  # as written when its ensemble is the better on val
    (out / "results.json").write_text(json.dumps(report))
    assert adapter_paths([], [str(out)], "ensemble")[0] == str(task_dirs[0] / "ensemble")
    assert adapter_paths([], [str(out)])[0] == str(task_dirs[0] / "adapter")
    # One task's adapter and ensemble together: two columns told apart by their directories.
    both = [str(task_dirs[0] / "adapter"), str(task_dirs[0] / "ensemble")]
    assert predicted("--adapter", *both) == (0, ["synth-colour@adapter", "synth-colour@ensemble"])

    assert predict_main(["--run", str(images), "--images", str(images)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not an output directory of inca-train" in err


def test_adapters_trained_through_the_final_norm_are_served_through_it(tmp_path):
    """inca-compare --final-norm trains InCA on the last block's tokens through the backbone's final norm
    (Backbone.extract, the training path): the served model reads them the same way."""
    from inca import InCA, TaskAdapter, save_adapter
    from inca.backbone import create_backbone

    from .conftest import TINY_KWARGS, randomise

    backbone = create_backbone("vit_tiny_patch16_224", "random", TINY_KWARGS, final_norm=True)
    with torch.no_grad():
        backbone.model.norm.weight.mul_(3.0)  # a norm that changes the tokens
    last = backbone.num_blocks - 1
    adapter = TaskAdapter([randomise(InCA(backbone.width, 3, backbone.num_heads, seed=0))], [last], list("abc"),
                          {"backbone": backbone.describe(), "task": "t"})
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapter(backbone.extract(images, [last]))
        torch.testing.assert_close(MultiTaskInCA(backbone, {"t": adapter})(images)["t"], expected, atol=1e-5, rtol=0)
    save_adapter(adapter, tmp_path / "a")
    assert MultiTaskInCA.from_saved([tmp_path / "a"]).final_norm
