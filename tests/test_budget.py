"""Layer choice inside a comparison (inca.layers=best:K, ranked on train and val only) and tuning budgets: the
configurations each method trains, and --equal-budget making them equal."""

import json

import numpy as np
import pytest

from inca.compare import run_comparison
from inca.errors import InCAError
from inca.methods import METHODS, RunConfig, run_method
from inca.methods.budget import equal_budget, trained_configurations
from inca.probe import probe_task
from inca.probes import ProbeRunConfig, ProbeSuiteConfig
from inca.probes.ranking import rank_by_probe, rank_on_val
from inca.tasks import Split, Task

from .conftest import subset_task

SIZES = {"train": 64, "val": 32, "test": 32}


class Unreadable:
    """A split source whose images must never be read."""

    in_memory = True

    def load(self, row):
        raise AssertionError(f"test row {row} was read")

    def describe(self, row):
        return f"unreadable row {row}"


def test_ranking_on_val_never_reads_test_and_matches_the_probe_report(tiny_backbone):
    task = subset_task("synth-shapes", SIZES)
    test = task.splits["test"]
    sealed = Task(task.spec, task.classes, {**task.splits, "test": Split(Unreadable(), test.rows, test.labels)},
                  task.identity)
    ranking = rank_on_val(tiny_backbone, sealed, [1, 3], "linear", ProbeRunConfig())
    reported = probe_task(tiny_backbone, task, [1, 3], ProbeSuiteConfig(probes=["linear"]))["results"]
    assert ranking == rank_by_probe(reported, "linear")  # val scores do not depend on the test split


def test_inca_trains_on_the_best_layers_of_its_probe(tiny_backbone, tmp_path):
    task = subset_task("synth-shapes", SIZES)
    settings = RunConfig(epochs=1, batch_size=32)
    result = run_method("inca", tiny_backbone, task, {"layers": "best:2", "rank_by": "linear"}, settings, tmp_path)
    ranking = result.to_dict()["layer_ranking"]
    expected = rank_on_val(tiny_backbone, task, [0, 1, 2, 3], "linear", ProbeRunConfig(batch_size=32))
    assert ranking == expected.to_dict() and ranking["rank_by"] == "linear"
    assert result.best["layer"] in expected.best(2)
    assert "layer_ranking" not in run_method("inca", tiny_backbone, task, {"layers": "-1"}, settings,
                                             tmp_path / "plain").to_dict()
    with pytest.raises(InCAError, match="the backbone has 4 blocks, use best:1..best:4"):
        run_method("inca", tiny_backbone, task, {"layers": "best:5"}, settings, tmp_path / "five")
    with pytest.raises(InCAError, match="inca.rank_by: expected a probe"):
        METHODS["inca"].make_config({"rank_by": "svm"})


def test_configurations_counted_per_method_and_made_equal():
    methods = {name: METHODS[name].defaults() for name in ("inca", "lora", "compacter", "linear")}
    tuned = RunConfig(lr_grid=3)
    counts = {name: trained_configurations(name, hparams, tuned, num_blocks=4) for name, hparams in methods.items()}
    assert counts == {"inca": {"total": 12, "axes": {"lr": 3, "layers": 4}},
                      "lora": {"total": 3, "axes": {"lr": 3}},
                      "compacter": {"total": 9, "axes": {"lr": 3, "reduction": 3}},
                      "linear": {"total": 3, "axes": {"lr": 3}}}
    assert trained_configurations("inca", {**methods["inca"], "layers": "best:2", "queries": [1, 4]}, tuned,
                                  num_blocks=4) == {"total": 12, "axes": {"lr": 3, "queries": 2, "layers": 2}}
    for grid in (1, 3):
        settings = RunConfig(lr_grid=grid)
        equal = equal_budget(methods, settings, num_blocks=4)
        assert {name: trained_configurations(name, hparams, settings, 4)["total"] for name, hparams in equal.items()} \
            == dict.fromkeys(methods, grid)
        assert equal["inca"]["layers"] == "best:1" and equal["inca"]["rank_by"] == "linear"
        assert equal["compacter"]["reduction_grid"] == [methods["compacter"]["reduction"]]
        assert equal["lora"] == methods["lora"]
    with pytest.raises(InCAError, match="inca's grid has 6 adapters per layer, which does not divide the budget of 3"):
        equal_budget({"inca": {**methods["inca"], "queries": [1, 4]}}, tuned, num_blocks=4)
    equal = equal_budget({"inca": {**methods["inca"], "lr": [1e-3]}}, RunConfig(lr_grid=1), num_blocks=4)
    assert equal["inca"]["layers"] == "best:1"


def test_equal_budget_comparison_records_its_budget(tiny_backbone, tmp_path):
    task = subset_task("synth-shapes", SIZES)
    methods = {name: METHODS[name].defaults() for name in ("inca", "linear")}
    summary = run_comparison(tiny_backbone, ["synth-shapes"], methods, RunConfig(epochs=1, batch_size=32, lr_grid=2),
                             tmp_path, load=lambda spec: task, equal_budget=True)
    assert summary["config"]["equal_budget"] is True and summary["protocol"]["equal_budget"] is True
    records = {r["method"]: r for r in summary["results"]}
    assert {name: r["configurations"] for name, r in records.items()} == {
        "inca": {"total": 2, "axes": {"lr": 2}}, "linear": {"total": 2, "axes": {"lr": 2}}}
    assert records["inca"]["hparams"]["layers"] == "best:1" and records["inca"]["layer_ranking"]["rank_by"] == "linear"
    assert [records["inca"]["tuned"]["layer"]] == records["inca"]["layer_ranking"]["ranking"][:1]
    text = (tmp_path / "compare.md").read_text()
    assert "| configurations |" in text and "tuning budget: equal, 2 trained configuration(s)" in text
    assert f"inca's layers: best:1, ranked on val by the linear probe: {records['inca']['layer_ranking']['ranked']}" \
        in text
    assert json.loads((tmp_path / "compare.json").read_text())["results"][0]["configurations"]["total"] == 2
    with pytest.raises(InCAError, match="differs in equal_budget"):
        run_comparison(tiny_backbone, ["synth-shapes"], methods, RunConfig(epochs=1, batch_size=32, lr_grid=2),
                       tmp_path, load=lambda spec: task)
    assert np.isfinite(records["inca"]["test_acc"])
