"""What the commands report: one batch size everywhere, ensemble rules, results.md's legend, split sizes and chance
levels, progress lines in a redirected log, and one trainable-share figure."""

from __future__ import annotations

import inspect

import torch

from inca import cli
from inca import options as opt


def test_every_command_and_library_default_uses_one_batch_size():
    from inca.activations import open_source
    from inca.cache import build_cache
    from inca.prediction import predict_images
    from inca.train.e2e import FitConfig

    parsers = (cli.cache_parser, cli.compare_parser, cli.train_parser, cli.probe_parser, cli.predict_parser)
    assert {make().options["batch_size"].default for make in parsers} == {opt.BATCH_SIZE}
    defaults = {inspect.signature(f).parameters["batch_size"].default for f in (open_source, build_cache,
                                                                                 predict_images)}
    assert defaults | {FitConfig().batch_size} == {opt.BATCH_SIZE}



def _train(tmp_path, config, layers=(0, 1), spec="synth-count"):
    from inca.backbone import create_backbone
    from inca.training import run_train_suite
    from tests.conftest import subset_task

    backbone = create_backbone("vit_tiny_patch16_224", "random", {"img_size": 32, "patch_size": 8, "depth": 2})
    task = subset_task(spec, {"train": 60, "val": 30, "test": 30})
    results = run_train_suite(backbone, [spec], lambda _: list(layers), ",".join(map(str, layers)), config,
                              tmp_path / "run", load_task=lambda _: task)
    return results, results["tasks"][spec]


def test_serve_prefers_the_adapter_unless_the_ensemble_is_better_on_val():
    from inca.train.runner import serve

    assert serve(0.5, None) == "adapter"
    assert serve(0.5, {"val_acc": 0.5}) == "adapter"  # a tie: the same accuracy for one adapter's cost
    assert serve(float(torch.tensor(17 / 30).float()), {"val_acc": 17 / 30}) == "adapter"  # 17 of 30 both: a tie
    assert serve(0.5, {"val_acc": 0.49}) == "adapter"
    assert serve(0.5, {"val_acc": 0.51}) == "ensemble"
    assert serve(0.5, {"requested": 2, "k": 1, "members": [0]}) == "adapter"  # none was made


def test_ensemble_larger_than_the_grid_is_warned_and_recorded(tmp_path, caplog):
    from inca.train.config import InCATrainConfig
    from inca.training import render_results, written_files

    results, task = _train(tmp_path, InCATrainConfig(epochs=1, lr=[3e-3], ensemble=3, cache="never"))
    assert (task["ensemble"]["requested"], task["ensemble"]["k"]) == (3, 2)
    assert task["warnings"][0] == ("--ensemble 3 asked for 3 adapters and only 2 of the 2 did not diverge: the "
                                   "ensemble has 2 members")
    assert any(r.levelname == "WARNING" and task["warnings"][0] in r.getMessage() for r in caplog.records)
    assert task["serve_dir"] == f"{task['directory']}/{task['serve']}"
    assert (tmp_path / "run" / task["serve_dir"] / "adapter_config.json").is_file()
    text = render_results(results)
    assert "top 2 (3 asked)" in text and f"Warning: {task['warnings'][0]}." in text
    assert "<task>-<fingerprint>/ensemble/" in written_files(results)

    results, task = _train(tmp_path / "one", InCATrainConfig(epochs=1, lr=[3e-3], ensemble=2, cache="never"),
                           layers=(1,))
    assert task["ensemble"] == {"requested": 2, "k": 1, "members": [0]}  # one adapter is no ensemble
    assert task["serve"] == "adapter" and "no ensemble is made" in task["warnings"][0]
    assert not (tmp_path / "one" / "run" / task["directory"] / "ensemble").exists()
    assert "<task>-<fingerprint>/ensemble/" not in written_files(results)
    assert "none (2 asked)" in render_results(results)


def test_an_ensemble_below_the_best_adapter_is_reported_and_not_served(tmp_path, monkeypatch):
    import inca.train.runner
    from inca.train.config import InCATrainConfig
    from inca.training import render_results

    monkeypatch.setattr(inca.train.runner, "evaluate_ensemble", lambda *args: 0.0)  # worse than any adapter
    results, task = _train(tmp_path, InCATrainConfig(epochs=1, lr=[3e-3], ensemble=2, cache="never"))
    assert task["ensemble"]["val_acc"] == 0.0 < task["val_acc"]
    assert task["serve"] == "adapter" and task["serve_dir"].endswith("/adapter")
    assert task["warnings"] == [f"the ensemble of 2 is below the best single adapter on val (0.0000 vs "
                                f"{task['val_acc']:.4f}): it is saved but not served by default"]
    assert f"Warning: {task['warnings'][0]}." in render_results(results)


def test_an_ensemble_tied_with_the_best_adapter_is_reported_and_not_served(tmp_path, monkeypatch):
    import inca.train.runner
    from inca.train.config import InCATrainConfig

    real = inca.train.runner.evaluate_ensemble  # an ensemble of the best adapter alone: the same answers, a tie
    monkeypatch.setattr(inca.train.runner, "evaluate_ensemble",
                        lambda bank, source, members, split: real(bank, source, members[:1], split))
    _, task = _train(tmp_path, InCATrainConfig(epochs=1, lr=[3e-3], ensemble=2, cache="never"))
    assert task["serve"] == "adapter" and task["serve_dir"].endswith("/adapter")
    assert task["warnings"] == [f"the ensemble of 2 is tied with the best single adapter on val "
                                f"({task['ensemble']['val_acc']:.4f} vs {task['val_acc']:.4f}): it is saved but not "
                                "served by default"]


def test_results_md_has_a_legend_split_sizes_and_chance_levels(tmp_path, caplog):
    import logging

    import numpy as np

    from inca.adapters.common import percent_text
    from inca.train.config import InCATrainConfig
    from inca.training import render_results
    from tests.conftest import subset_task

    with caplog.at_level(logging.INFO, logger="inca"):
        results, task = _train(tmp_path, InCATrainConfig(epochs=1, lr=[3e-3], cache="never"))
    text = render_results(results)
    for column in ("**best layer**", "**queries**", "**params**", "**% backbone**", "**adapters**",
                   "**activations**", "**seconds**", "**val acc**", "**test acc**"):
        assert column in text, column
    assert "ensemble" not in text  # no column to explain
    labels = {split: s.labels for split, s in subset_task("synth-count", {"train": 60, "val": 30, "test": 30})
              .splits.items()}
    majority = np.bincount(labels["train"]).argmax()
    expected = {"chance": 1 / 5, **{f"majority_{s}": float(np.mean(labels[s] == majority)) for s in ("val", "test")}}
    assert task["baselines"] == expected
    assert "| synth-count | 5       | 60         | 30       | 30        | 0.2    |" in text
    # One trainable share: the log line and the table print the same figure, of the backbone's parameter count.
    backbone_params = sum(p.numel() for p in _backbone_model().parameters())
    assert task["backbone_params"] == backbone_params
    share = percent_text(100 * task["trainable_params"] / backbone_params)
    assert f"| {share}" in text and f"{share} of the backbone's {backbone_params:,}" in caplog.text


def _backbone_model():
    from inca.backbone import create_backbone

    return create_backbone("vit_tiny_patch16_224", "random", {"img_size": 32, "patch_size": 8, "depth": 2}).model



def test_lora_logs_the_share_of_the_backbone(caplog):
    """The share inca-compare tables (trainable / the backbone's parameters) is the one LoRA logs, not a share of
    the adapted model's parameters (which grow with LoRA's own)."""
    import logging
    import re

    from inca.adapters.common import count_parameters, percent_text
    from inca.adapters.lora import apply_lora
    from inca.backbone import create_backbone
    from inca.train.e2e import trainable_copy

    backbone = create_backbone("vit_tiny_patch16_224", "random", {"img_size": 32, "patch_size": 8, "depth": 2})
    total = sum(p.numel() for p in backbone.model.parameters())
    model = trainable_copy(backbone, 5)
    with caplog.at_level(logging.INFO, logger="inca"):
        apply_lora(model, rank=2)
    count = count_parameters(model)
    logged = re.search(r"\(([\d.]+%) of the backbone's ([\d,]+)\)", caplog.text)
    assert logged.groups() == (percent_text(100 * count.trainable / total), f"{total:,}")
    assert logged.group(1) != percent_text(100 * count.trainable / count.total)  # the other denominator differs


def test_redirected_progress_is_at_most_one_line_per_tenth_of_the_command(caplog):
    import logging

    from inca.progress import command_units, progress, unit_done

    def loops(units: int, per_unit: int, steps: int) -> int:
        caplog.clear()
        for _ in range(units):
            for _ in range(per_unit):
                for _ in progress(range(steps), desc="loop"):
                    pass
            unit_done()
        return len([r for r in caplog.records if r.name == "inca.progress"])

    with caplog.at_level(logging.INFO, logger="inca"):
        assert loops(1, 1, 50) == 10  # a loop alone: one line per tenth of it
        with command_units(7):
            assert loops(7, 3, 50) <= 10  # 21 loops in 7 units: still at most ten lines
        with command_units(30):
            assert 5 <= loops(30, 2, 5) <= 10  # more units than tenths: one line per tenth at most
        with command_units(1), command_units(5):  # a command within a unit of another counts in the outer one
            lines = loops(1, 4, 50)
        # one unit of four loops in turn: the first has half the unit, each later one half of what is left
        assert lines == 5 + 2 + 1 + 1


def test_a_suite_logs_at_most_ten_progress_lines(tmp_path, caplog, monkeypatch):
    import logging

    import inca.progress
    from inca.train.config import InCATrainConfig

    monkeypatch.setattr(inca.progress.sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="inca"):
        _train(tmp_path, InCATrainConfig(epochs=3, lr=[1e-3, 3e-3], cache="always"))
    lines = [r.getMessage() for r in caplog.records if r.name == "inca.progress"]
    assert 1 <= len(lines) <= 10 and all("unit 1 of 1" in line for line in lines)
    per_epoch = [r for r in caplog.records if r.levelno >= logging.INFO and "epoch 1/3" in r.getMessage()]
    assert not per_epoch and "best val accuracy" in lines[-1]  # the epoch's figures ride on the progress line


def test_a_folder_task_is_shown_by_its_folder_s_name_and_recorded_by_its_spec(tmp_path, caplog):
    """results.md, the printed summary, probe.md, compare.md and the log name a folder task by its folder (two
    folders of one name by their specs), while the JSON keeps the canonical spec and the spec as typed."""
    import logging

    from inca.backbone import create_backbone
    from inca.compare import _store, render_markdown
    from inca.probe import render_probe_report, summary_lines
    from inca.tasks import Task, task_names
    from inca.train.config import InCATrainConfig
    from inca.training import render_results, render_summary, run_train_suite
    from tests.conftest import subset_task

    spec = "folder:/data/pets"
    data = subset_task("synth-count", {"train": 40, "val": 20, "test": 20})
    task = Task(spec, data.classes, data.splits, data.identity, typed_spec="folder:../data/pets/")
    backbone = create_backbone("vit_tiny_patch16_224", "random", {"img_size": 32, "patch_size": 8, "depth": 2})
    with caplog.at_level(logging.INFO, logger="inca"):
        results = run_train_suite(backbone, [spec], lambda _: [1], "1", InCATrainConfig(epochs=1, lr=[3e-3],
                                  cache="never"), tmp_path, load_task=lambda _: task)
    assert results["tasks"][spec]["typed_spec"] == "folder:../data/pets/"
    assert "pets: best layer 1" in caplog.text and "/data/pets" not in caplog.text
    shown = [render_results(results), render_summary(results)]

    scores = {"0": {"val": 0.5, "test": 0.5}}
    shown += [render_probe_report({"backbone": backbone.describe(), "tasks": {spec: {
        "layers": [0], "results": {"knn/cls": scores}, "best_layers": {"knn/cls": [0]}, "rankings": {}}}})]
    shown += summary_lines({"tasks": {spec: {"results": {"knn/cls": scores}, "best_layers": {"knn/cls": [0]}}}})

    report = {"config": {"seed": 0, "backbone": "b", "weights": "random", "epochs": 1, "batch_size": 2,
                         "device": "cpu"}, "backbone_params": 10, "memory": "m", "results": []}
    for method, curve in (("lora", [1.0, 0.9, 0.8]), ("linear", [0.9, 0.9, 0.9])):
        _store(report, method, {"task": spec, "method": method, "loss_curve": curve, "steps": 3, "test_acc": 0.5,
                                "val_acc": 0.5, "best_epoch": 1, "trainable_params": 1, "trainable_pct": 10.0,
                                "seconds": 1.0, "peak_memory_mb": None, "hparams": {}, "key": method,
                                "task_info": {"classes": 2, "sizes": {"train": 6}}})
    shown.append(render_markdown(report))
    for text in shown:
        assert "pets" in text and "/data/pets" not in text, text
    assert "## pets" in shown[0] and "| pets " in shown[1] and "## pets (2 classes" in shown[-1]
    assert "\n| pets " in shown[-1].split("## Convergence")[1]

    assert task_names([spec, "folder:/elsewhere/pets", "folder:/data/faces", "digits", "folder:/data/digits"]) == {
        spec: spec, "folder:/elsewhere/pets": "folder:/elsewhere/pets", "folder:/data/faces": "faces",
        "digits": "digits", "folder:/data/digits": "folder:/data/digits"}  # alike names: the specs, told apart
