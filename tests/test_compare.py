"""inca-compare: every method through the CLI, reports that parse, resumable reruns, one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm

import inca.methods
import inca.tasks
from inca.cli import compare_main, compare_parser
from inca.compare import protocol_lines
from inca.methods import METHODS, RunConfig, methods_help
from inca.recipe import load_recipe
from inca.tasks import SPLITS, Task

from .conftest import TINY_ARGS, TINY_KWARGS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZES = {"train": 64, "val": 32, "test": 32}
E2E = [m for m in METHODS if m != "inca"]
ALL = list(METHODS)
BASE = [*TINY_ARGS, "--device", "cpu", "--tasks", "synth-shapes", "--epochs", "1", "--batch-size", "16"]


@pytest.fixture(autouse=True)
def small_tasks(monkeypatch):
    """Tasks cut to a few batches, so a whole comparison takes seconds (the CLI loads them through here)."""
    real = inca.tasks.load_task

    def load_small(spec, *args, **kwargs):
        task = real(spec, *args, **kwargs)
        splits = {name: task.splits[name].subset(np.arange(SIZES[name])) for name in SPLITS}
        return Task(task.spec, task.classes, splits, task.identity)

    monkeypatch.setattr(inca.tasks, "load_task", load_small)


def compare(out: Path, *extra: str, method_args: tuple[str, ...] = ()) -> int:
    return compare_main([*BASE, "--out", str(out), *extra, "--method-args", *method_args])


def lora_count(rank: int, dim: int = 192, hidden: int = 768, depth: int = 4, classes: int = 4) -> int:
    """rank * (in + out) for qkv, proj, fc1, fc2 of every block, plus the head."""
    per_block = rank * ((dim + 3 * dim) + (dim + dim) + (dim + hidden) + (hidden + dim))
    return depth * per_block + dim * classes + classes


def backbone_params() -> int:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_KWARGS)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_compare_runs_every_method_writes_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare(out, "--methods", ",".join(ALL), method_args=("lora.rank=4", "linear.pool=mean")) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    records = {r["method"]: r for r in summary["results"]}
    assert list(records) == ALL
    for r in records.values():
        assert r["task"] == "synth-shapes" and 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert r["seconds"] > 0 and r["peak_memory_mb"] > 0 and r["trainable_params"] > 0
        assert r["steps"] > 0 and len(r["loss_curve"]) > 0
        assert f"| {r['method']} " in printed
    for m in E2E:
        assert records[m]["steps"] == SIZES["train"] // 16 == len(records[m]["loss_curve"])
    # trainable counts and percentages, computed independently
    total = backbone_params()
    assert summary["backbone_params"] == total
    assert records["lora"]["trainable_params"] == lora_count(4)
    assert records["lora"]["hparams"]["rank"] == 4
    assert records["linear"]["trainable_params"] == 192 * 4 + 4
    assert records["full"]["trainable_params"] == total + 192 * 4 + 4
    for m in ("lora", "linear", "full"):
        assert records[m]["trainable_pct"] == pytest.approx(100 * records[m]["trainable_params"] / total)
    # the defaults: --equal-budget is a flag, off unless given
    assert summary["protocol"] == {"model_selection": "best-val-epoch", "head_init": "linear-probe",
                                   "augment": False, "lr_grid": 1, "final_norm": False, "equal_budget": False}
    assert records["inca"]["best_epoch"] == 1 and records["lora"]["tuned"] == {"lr": 5e-4}
    markdown = (out / "compare.md").read_text()
    assert all(f"| {m} " in markdown for m in ALL) and "## synth-shapes" in markdown
    assert "## Protocol" in markdown and "linear-probe-then-fine-tune" in markdown
    for png in ("compare_accuracy_vs_params.png", "compare_loss.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC

    # Rerun with lora's default rank: only lora trains again; every other finished pair is kept as it was.
    assert compare(out, "--methods", ",".join(ALL), method_args=("linear.pool=mean",)) == 0
    rerun = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["results"]}
    assert list(rerun) == ALL
    assert rerun["lora"]["trainable_params"] == lora_count(8) != records["lora"]["trainable_params"]
    assert all(rerun[m] == records[m] for m in ALL if m != "lora")


def one_line_error(capsys, code: int, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("inca-compare: error:"), err
    for word in words:
        assert word in err, err


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--methods", "lora,nope"], ["'nope'", "lora-ga"]),
        (["--methods", "lora", "--method-args", "lora.rnk=4"], ["'rnk'", "rank"]),
        (["--methods", "lora", "--method-args", "lorra.rank=4"], ["'lorra'", "did you mean lora"]),
        (["--methods", "lora", "--method-args", "lora.rank=x"], ["lora.rank"]),
        (["--methods", "lora", "--tasks", "synth-nope"], ["synth-nope"]),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, words):
    one_line_error(capsys, compare(tmp_path / "out", *extra), *words)
    assert not (tmp_path / "out" / "compare.json").exists()


@pytest.mark.slow
def test_recipe_with_unknown_key_and_mismatched_out_dir(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("backbone: vit_tiny_patch16_224\nepoch: 3\n")
    one_line_error(capsys, compare_main(["--recipe", str(recipe)]), "unknown keys epoch")
    out = tmp_path / "cmp"
    assert compare(out, "--methods", "linear") == 0
    capsys.readouterr()
    one_line_error(capsys, compare(out, "--methods", "linear", "--seed", "1"), "differs in seed")
    one_line_error(capsys, compare(out, "--methods", "linear", "--head-init", "zero"), "differs in head_init")


@pytest.mark.slow
def test_recipe_values_are_defaults_and_flags_override(tmp_path, monkeypatch):
    resolved, resolve = [], inca.methods.resolve_methods  # once, when the input is checked, and passed on
    monkeypatch.setattr(inca.methods, "resolve_methods", lambda *a: resolved.append(a) or resolve(*a))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "backbone: vit_tiny_patch16_224\nweights: random\nmodel_kwargs: {img_size: 32, patch_size: 8, depth: 4}\n"
        "device: cpu\ntasks: [synth-shapes]\nmethods: [full]\nmethod_args: {lora: {rank: 4, lr: 1.0e-3}}\n"
        f"epochs: 1\nbatch_size: 16\nout: {tmp_path / 'from-recipe'}\n"
    )
    argv = ["--recipe", str(recipe), "--methods", "lora", "--batch-size", "32", "--method-args", "lora.rank=2"]
    assert compare_main(argv) == 0
    summary = json.loads((tmp_path / "from-recipe" / "compare.json").read_text())
    assert [r["method"] for r in summary["results"]] == ["lora"]
    assert summary["config"]["batch_size"] == 32 and summary["config"]["epochs"] == 1
    hparams = summary["results"][0]["hparams"]
    assert hparams["rank"] == 2 and hparams["lr"] == 1e-3  # the flag wins, the recipe's other keys stay
    assert summary["results"][0]["trainable_params"] == lora_count(2)
    assert len(resolved) == 1


def test_demo_recipe_has_only_valid_keys():
    parser = compare_parser()
    valid = {dest for dest in parser.options if dest not in ("help", "recipe")}
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "compare-demo.yaml", valid)
    assert set(recipe["methods"]) == set(METHODS)


def test_help_lists_every_registered_method():
    text = compare_parser().format_help()
    assert methods_help(78) in text and "--export-peft" in text


def test_the_protocol_is_stated_under_the_tables():
    settings = RunConfig(head_init="zero", augment=True, lr_grid=3)
    lines = protocol_lines({"model_selection": "best-val-epoch", **settings.protocol(), "final_norm": True})
    text = "\n".join(lines)
    assert "best-validation epoch" in text and "zeros" in text and "timm's training transform" in text
    assert "over 3 values x3 apart" in text and "final norm, as DINO" in text


def test_steps_to_reach_a_loss_reads_the_smoothed_curve():
    from inca import convergence as curves

    assert curves.smoothed_loss([4.0, 2.0, 0.0], window=2).tolist() == [4.0, 3.0, 1.0]
    assert curves.steps_to_reach([4.0, 2.0, 0.0, 0.0], 1.0, window=2) == 3
    assert curves.steps_to_reach([4.0, 2.0], 1.0, window=1) is None
