"""Training curves: one entry per epoch in results.json and compare.json, agreeing with the reported figures; a plot
per task linked from the reports; TensorBoard runs read back with TensorBoard's own reader, no epoch twice after a
resume."""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

import inca.train.bank as bank_module
from inca.adapters.inca import InCABank
from inca.cli import compare_main, train_main
from inca.train.bank import train_bank
from inca.training_log import TrainingLog, adapter_names, run_name

from .conftest import TINY_ARGS
from .test_bank_training import CLASSES, DIM, SPECS, Crash, CrashingSource, separable_source
from .test_compare import small_tasks  # noqa: F401 (a fixture, autouse: tasks cut to a few batches)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_TENSORBOARD = "tensorboard is not installed (pip install inca[tensorboard]; the test extra has it)"


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of ``tag`` in TensorBoard run directory ``run`` as TensorBoard shows them (its reader,
    purges applied)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator", reason=NO_TENSORBOARD)
    events = accumulator.EventAccumulator(str(run))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def assert_curve(shown: list[tuple[int, float]], curve: list[float | None]) -> None:
    """TensorBoard shows each finite value of ``curve`` once, at its 1-based epoch (as float32)."""
    expected = [(epoch, value) for epoch, value in enumerate(curve, 1) if value is not None]
    assert [epoch for epoch, _ in shown] == [epoch for epoch, _ in expected]
    np.testing.assert_allclose([v for _, v in shown], [v for _, v in expected], rtol=1e-6)


def assert_reported_at_best_epoch(record: dict) -> None:
    """One value per epoch in each curve, and the curve's best epoch is the reported one (ties: the earlier)."""
    loss, val = record["epoch_loss"], record["val_curve"]
    assert len(loss) == len(val) > 0
    finite = [v for v in val if v is not None]
    assert val[record["best_epoch"] - 1] == record["val_acc"] == max(finite)
    assert val.index(max(finite)) == record["best_epoch"] - 1


def test_adapter_names_show_what_varies_and_stay_unique():
    specs = [{"layer": layer, "lr": lr, "weight_decay": 1e-4, "num_queries": 1, "num_heads": 3, "mlp_ratio": 0.0,
              "seed": 0} for layer in (2, 5) for lr in (1e-3, 3e-3)]
    assert adapter_names(specs) == ["layer2-lr0.001", "layer2-lr0.003", "layer5-lr0.001", "layer5-lr0.003"]
    assert adapter_names(specs[:1] * 2) == ["0-layer2", "1-layer2"]
    assert run_name({"lr": 0.0005, "target": "blocks/attn"}) == "lr0.0005-targetblocks_attn"


@pytest.mark.slow
def test_train_records_every_adapters_curves_plots_and_logs_them(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason=NO_TENSORBOARD)
    out, logs, epochs = tmp_path / "run", tmp_path / "tb", 4
    code = train_main([*TINY_ARGS, "--device", "cpu", "--tasks", "synth-colour", "--layers", "last:2",
                       "--lr", "3e-3,1e-3", "--epochs", str(epochs), "--batch-size", "16", "--search", "halving",
                       "--min-epochs", "1", "--cache", "never", "--out", str(out), "--log-dir", str(logs)])
    assert code == 0, capsys.readouterr().err
    task = json.loads((out / "results.json").read_text())["tasks"]["synth-colour"]
    adapters = task["adapters"]
    assert {a["epochs_trained"] for a in adapters} > {epochs}  # some pruned, some to the end
    for a in adapters:  # every grid point, a pruned one up to its rung
        assert len(a["epoch_loss"]) == len(a["val_curve"]) == a["epochs_trained"]
        assert a["epoch_loss"][-1] == a["final_train_loss"]
        assert_reported_at_best_epoch(a)
    best = adapters[task["best"]["index"]]
    assert task["loss_curve"] == best["epoch_loss"] and task["val_acc"] == best["val_acc"]

    plot = out / task["directory"] / "curves.png"
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert f"]({task['directory']}/curves.png)" in (out / "results.md").read_text()

    runs = logs / task["directory"]
    assert sorted(p.name for p in runs.iterdir()) == sorted(adapter_names(adapters))
    for name, a in zip(adapter_names(adapters), adapters):
        assert_curve(scalars(runs / name, "train/loss"), a["epoch_loss"])
        assert_curve(scalars(runs / name, "val/accuracy"), a["val_curve"])
        lr = scalars(runs / name, "lr")
        assert [e for e, _ in lr] == list(range(1, a["epochs_trained"] + 1))
        assert all(0 <= v <= a["lr"] for _, v in lr)
        if a["epochs_trained"] == epochs:  # the cosine schedule ends at 0 after the last step
            assert lr[-1][1] == pytest.approx(0.0, abs=1e-9)


def test_a_resumed_bank_shows_each_epoch_once(tmp_path, monkeypatch):
    """Killed after epoch 2 was logged but before its checkpoint was written: the resumed run trains epoch 2 again,
    and TensorBoard shows epochs 1, 2, 3 once each, with the uninterrupted run's values."""
    pytest.importorskip("tensorboard", reason=NO_TENSORBOARD)
    source = separable_source(n_train=64, n_val=32)
    kwargs = dict(epochs=3, batch_size=16, seed=3, eval_split="val", progress=False)
    expected = train_bank(InCABank(SPECS, DIM, CLASSES), source, **kwargs)

    save = bank_module._save_checkpoint
    monkeypatch.setattr(bank_module, "_save_checkpoint",
                        lambda path, *args: save(path, *args) if args[3] == 1 else None)  # args[3]: the epoch
    path, logs = tmp_path / "checkpoint.safetensors", tmp_path / "tb"
    first = TrainingLog(logs)
    with pytest.raises(Crash):
        train_bank(InCABank(SPECS, DIM, CLASSES), CrashingSource(source, epoch=2), checkpoint_path=path, log=first,
                   **kwargs)
    first.close()
    monkeypatch.setattr(bank_module, "_save_checkpoint", save)
    second = TrainingLog(logs)  # a new process
    resumed = train_bank(InCABank(SPECS, DIM, CLASSES), source, checkpoint_path=path, log=second, **kwargs)
    second.close()
    assert resumed == expected
    names = adapter_names([asdict(spec) for spec in SPECS])
    for i, name in enumerate(names):
        assert_curve(scalars(logs / name, "train/loss"), [row[i] for row in expected.train_loss])
        assert_curve(scalars(logs / name, "val/accuracy"), [row[i] for row in expected.val_accuracy])


@pytest.mark.slow
def test_compare_records_each_methods_curves_plots_and_logs_them(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason=NO_TENSORBOARD)
    out, logs, epochs = tmp_path / "compare", tmp_path / "tb", 2
    code = compare_main([*TINY_ARGS, "--device", "cpu", "--tasks", "synth-shapes", "--methods", "linear,lora,inca",
                         "--epochs", str(epochs), "--batch-size", "16", "--lr-grid", "2", "--out", str(out),
                         "--log-dir", str(logs), "--method-args", "inca.layers=-1"])
    assert code == 0, capsys.readouterr().err
    records = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["results"]}
    directory = records["lora"]["task_info"]["directory"]
    for method, r in records.items():
        assert_reported_at_best_epoch(r)
        assert len(r["val_curve"]) == epochs
        if method != "inca":  # each epoch's loss is the mean of its steps' (the per-step curve, kept as it was)
            per_epoch = np.asarray(r["loss_curve"]).reshape(epochs, -1).mean(1)
            np.testing.assert_allclose(r["epoch_loss"], per_epoch, rtol=1e-5)
            run = logs / directory / method / run_name(r["tuned"])  # the chosen point of the two tuned
            assert len(list((logs / directory / method).iterdir())) == 2
        else:  # one run per adapter of the bank (two learning rates), the chosen one among them
            runs = list((logs / directory / method).iterdir())
            assert len(runs) == 2
            run = next(p for p in runs if p.name.endswith(f"lr{r['tuned']['lr']:g}"))
        assert_curve(scalars(run, "train/loss"), r["epoch_loss"])
        assert_curve(scalars(run, "val/accuracy"), r["val_curve"])
    assert (out / "runs" / directory / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert f"](runs/{directory}/curves.png)" in (out / "compare.md").read_text()


def test_log_dir_without_tensorboard_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else
                        find_spec(name, *a))
    code = train_main([*TINY_ARGS, "--tasks", "synth-colour", "--out", str(tmp_path / "run"),
                       "--log-dir", str(tmp_path / "tb")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "pip install inca[tensorboard]" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
