"""Successive halving inside a bank: the schedule, the decisions, survivors bit-identical to a bank that prunes
nothing, the shrinking bank and source, resuming after a kill, and the reports."""

import json
import math

import numpy as np
import pytest
import torch

import inca.train.bank as bank_module
from inca.activations import LiveSource, TensorSource, narrow_source
from inca.adapters.inca import AdapterSpec, InCABank
from inca.cli import train_main
from inca.errors import InCAError
from inca.probe import probe_config, probe_task
from inca.probes import ProbeSuiteConfig
from inca.train.bank import train_bank
from inca.train.halving import SuccessiveHalving
from inca.train.optim import BatchedAdamW
from tests.conftest import TINY_ARGS, subset_task
from tests.test_bank_training import CLASSES, DIM, Crash, separable_source
from tests.test_distributed import inca as run_inca

# Layer 0 holds the signal, layer 1 is noise (see separable_source); two shapes, so two stacks.
GRID = [AdapterSpec(layer=layer, num_heads=4, num_queries=q, lr=lr, seed=s)
        for s, (layer, lr, q) in enumerate((layer, lr, q) for layer in (0, 1) for lr in (3e-3, 1e-3) for q in (1, 2))]
KWARGS = dict(epochs=4, batch_size=16, seed=3, eval_split="val", progress=False)
HALVING = SuccessiveHalving(rate=2)  # 4 epochs: rungs after epochs 1 and 2, 8 -> 4 -> 2 adapters


def test_rungs_fall_geometrically_and_end_at_the_last_epoch():
    assert SuccessiveHalving().rungs(9) == [1, 3]
    assert SuccessiveHalving().rungs(10) == [1, 3]
    assert SuccessiveHalving().rungs(15) == [2, 5]
    assert SuccessiveHalving().rungs(27) == [1, 3, 9]
    assert SuccessiveHalving().rungs(2) == []  # too short for a rung: every adapter trains throughout
    assert SuccessiveHalving(rate=2).rungs(4) == [1, 2]
    assert SuccessiveHalving(min_epochs=2).rungs(20) == [2, 6, 18]
    assert SuccessiveHalving(min_epochs=3).rungs(3) == []
    assert [SuccessiveHalving().keep(n) for n in (48, 16, 6, 2, 1)] == [16, 6, 2, 1, 1]
    with pytest.raises(InCAError, match="--min-epochs 4 is above --epochs 3"):
        SuccessiveHalving(min_epochs=4).rungs(3)
    with pytest.raises(InCAError, match="integer >= 2"):
        SuccessiveHalving(rate=1)


def test_survivors_are_the_best_on_val_ties_to_lower_train_loss_then_earlier_diverged_never():
    halving = SuccessiveHalving(rate=3)
    entered = [0, 1, 2, 3, 4, 5, 7]  # 6 was pruned earlier
    accuracy = [0.5, 0.9, 0.7, 0.7, 0.95, 0.7, math.nan, 0.1]
    loss = [1.0, 0.5, 0.8, 0.6, math.nan, 0.6, 1.0, 2.0]
    diverged = [False, False, False, False, True, False, False, False]
    # keep ceil(7 / 3) = 3: 1 (0.9), then of the 0.7s 3 and 5 (loss 0.6, 3 first) before 2; 4 diverged
    assert halving.survivors(entered, accuracy, loss, diverged) == [1, 3, 5]
    assert halving.survivors([4, 6], accuracy, loss, diverged) == []  # nothing left that has not diverged


def test_survivors_train_bit_identical_to_a_bank_that_prunes_nothing():
    source = separable_source(n_train=96, n_val=48)
    grid = InCABank(GRID, DIM, CLASSES)
    full = train_bank(grid, source, **KWARGS)
    halved = InCABank(GRID, DIM, CLASSES)
    history = train_bank(halved, source, halving=HALVING, **KWARGS)

    assert history.rungs == [{"rung": 1, "epoch": 1, "entered": 8, "kept": 4},
                             {"rung": 2, "epoch": 2, "entered": 4, "kept": 2}]
    survivors = [i for i, rung in enumerate(history.stopped_rung) if rung is None]
    assert len(survivors) == 2 and sorted(history.epochs_trained) == [1, 1, 1, 1, 2, 2, 4, 4]
    for i in range(len(GRID)):
        trained = history.epochs_trained[i]
        assert history.stopped_rung[i] == {1: 1, 2: 2, 4: None}[trained]
        for epoch in range(KWARGS["epochs"]):  # the same losses and accuracies to the bit while it trains
            for curve, reference in ((history.train_loss, full.train_loss), (history.val_accuracy, full.val_accuracy)):
                assert (curve[epoch][i] == reference[epoch][i]) if epoch < trained else math.isnan(curve[epoch][i])
        assert 1 <= history.best_epoch[i] <= trained
        if history.best_epoch[i] == full.best_epoch[i]:  # every survivor, and pruned ones that peaked before
            for name, value in grid.adapter(i).state_dict().items():
                assert torch.equal(halved.adapter(i).state_dict()[name], value), (i, name)
    assert all(history.best_epoch[i] == full.best_epoch[i] for i in survivors)

    # The rungs kept the best on val so far, as the history shows them.
    for rung in history.rungs:
        entered = [i for i in range(len(GRID)) if history.epochs_trained[i] >= rung["epoch"]]
        kept = [i for i in entered if history.epochs_trained[i] > rung["epoch"]]
        best_so_far = [max(history.val_accuracy[e][i] for e in range(rung["epoch"])) for i in range(len(GRID))]
        assert min(best_so_far[i] for i in kept) >= max(best_so_far[i] for i in entered if i not in kept)


def test_pruned_rows_leave_the_stacks_optimizer_and_plan():
    bank = InCABank(GRID, DIM, CLASSES)
    optimizer = BatchedAdamW(bank.optimizer_groups())
    steps = bank_module._BankSteps(bank, optimizer, lambda step: 1.0, torch.device("cpu"), 1, done=0)
    with torch.no_grad():
        for i, (stack, row) in enumerate(bank.locate(i) for i in range(len(bank))):
            for param in stack.params().values():
                optimizer.state_of(param)["exp_avg"][row] = i
    steps.keep([1, 2, 3])  # every adapter of layer 1 and one of layer 0 leave
    survivors = steps.bank
    assert len(survivors) == 3 and survivors.layers == [0] and steps.active == [1, 2, 3]
    assert sum(len(stack) for stack in survivors.stacks) == 3
    assert sum(p.shape[0] for g in steps.optimizer.groups for p in g["params"][:1]) == 2 * 3  # decayed + not
    for new, old in enumerate([1, 2, 3]):
        stack, row = survivors.locate(new)
        for name, param in stack.params().items():
            assert torch.equal(param[row], bank.locate(old)[0].params()[name][bank.locate(old)[1]])
            assert (steps.optimizer.state_of(param)["exp_avg"][row] == old).all()
    features = {0: torch.randn(3, 8, DIM), 1: torch.randn(3, 8, DIM)}
    with torch.no_grad():  # the survivors read layer 0 alone and give the whole bank's logits, to the bit
        assert torch.equal(survivors({0: features[0]}), bank(features)[1:4])


class KilledAt:
    """A source that dies at its ``at``-th train batch, like a killed run (it has no ``narrowed``: once layers are
    pruned, the bank reads it through a filter)."""

    def __init__(self, source: TensorSource, at: int) -> None:
        self.source, self.layers, self.at, self.batches = source, source.layers, at, 0

    def num_rows(self, split):
        return self.source.num_rows(split)

    def labels(self, split):
        return self.source.labels(split)

    def loader(self, split, batches):
        for item in self.source.loader(split, batches):
            self.batches += split == "train"
            if self.batches == self.at:
                raise Crash
            yield item


@pytest.mark.parametrize("kill", ["before the first rung", "after the second rung", "writing the rung's checkpoint"])
def test_killed_anywhere_and_rerun_equals_an_uninterrupted_run(tmp_path, monkeypatch, kill):
    source = separable_source(n_train=96, n_val=48)  # 6 batches per epoch
    expected_bank = InCABank(GRID, DIM, CLASSES)
    expected = train_bank(expected_bank, source, halving=HALVING, checkpoint_path=tmp_path / "a.safetensors", **KWARGS)

    path = tmp_path / "b.safetensors"
    if kill == "writing the rung's checkpoint":  # the rung's decision is taken, its checkpoint never written
        save = bank_module._save_checkpoint
        monkeypatch.setattr(bank_module, "_save_checkpoint", lambda *a: (_ for _ in ()).throw(Crash) if a[4] == 2
                            else save(*a))
        killed = source
    else:
        killed = KilledAt(source, at=4 if kill == "before the first rung" else 6 * 2 + 3)
    with pytest.raises(Crash):
        train_bank(InCABank(GRID, DIM, CLASSES), killed, halving=HALVING, checkpoint_path=path, **KWARGS)
    monkeypatch.undo()
    resumed = InCABank(GRID, DIM, CLASSES)  # a new process: nothing kept but the checkpoint
    history = train_bank(resumed, source, halving=HALVING, checkpoint_path=path, **KWARGS)
    assert repr(history) == repr(expected)  # NaN != NaN
    for name, value in expected_bank.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name

    # A grid run never resumes a halving run's checkpoint (nor the reverse): it starts afresh.
    grid = train_bank(InCABank(GRID, DIM, CLASSES), source, checkpoint_path=path, **KWARGS)
    assert grid.stopped_rung == [None] * len(GRID) and grid.epochs_trained == [4] * len(GRID)


def test_halving_needs_a_validation_split():
    with pytest.raises(InCAError, match="validation split"):
        train_bank(InCABank(GRID, DIM, CLASSES), separable_source(16, 8), epochs=2, batch_size=8, halving=HALVING)


def test_a_live_pass_stops_at_the_deepest_layer_a_survivor_reads(tiny_backbone, monkeypatch):
    task = subset_task("synth-shapes", {"train": 32, "val": 16, "test": 8})
    specs = [AdapterSpec(layer=layer, num_heads=3, lr=1e-3, seed=layer) for layer in (0, 1, 3)]
    scores = iter([[0.2, 0.9, 0.4], [0.92], [0.95]])  # epoch by epoch, of the adapters still training
    monkeypatch.setattr(bank_module, "evaluate_bank", lambda bank, *a, **k: torch.tensor(next(scores)))
    asked = []
    extract = tiny_backbone.extract
    monkeypatch.setattr(tiny_backbone, "extract", lambda images, layers: asked.append(list(layers))
                        or extract(images, layers))
    source = LiveSource(tiny_backbone, task, [0, 1, 3])
    bank = InCABank(specs, tiny_backbone.width, task.num_classes)
    history = train_bank(bank, source, epochs=3, batch_size=16, eval_split="val", progress=False,
                         halving=SuccessiveHalving(rate=3))
    assert history.stopped_rung == [1, None, 1] and history.epochs_trained == [1, 3, 1]
    assert asked == [[0, 1, 3]] * 2 + [[1]] * 4  # two batches an epoch: all three layers, then layer 1 alone
    assert len(bank) == 3 and history.best_epoch == [1, 3, 1]

    # Any source serves fewer layers: a store reads only their files, others are filtered.
    tensors = separable_source(8, 8)
    assert narrow_source(tensors, [0]).layers == [0] and narrow_source(tensors, [0, 1]) is tensors
    filtered = narrow_source(KilledAt(tensors, at=-1), [1])
    assert list(next(iter(filtered.loader("train", [np.arange(4)])))[0]) == [1]
    with pytest.raises(InCAError, match="lacks layers \\[2\\]"):
        narrow_source(tensors, [2])


@pytest.mark.slow
def test_inca_train_search_halving_from_a_recipe_reports_rungs_and_selects_over_all(tmp_path, capsys):
    recipe = tmp_path / "halving.yaml"
    recipe.write_text("tasks: [synth-colour]\nlayers: all\nlr: [3e-3, 1e-3]\nepochs: 3\nsearch: halving\n"
                      "halving_rate: 3\nensemble: 2\n")
    code, out = _run_train(tmp_path, "--recipe", str(recipe))
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["search"] == "halving" and results["config"]["halving_rate"] == 3
    task = results["tasks"]["synth-colour"]
    adapters = task["adapters"]
    assert len(adapters) == 8 and task["search"] == "halving"
    assert task["rungs"] == [{"rung": 1, "epoch": 1, "entered": 8, "kept": 3}]
    assert sorted(a["epochs_trained"] for a in adapters) == [1] * 5 + [3] * 3
    assert all((a["stopped_rung"] is None) == (a["epochs_trained"] == 3) for a in adapters)
    assert all(a["best_epoch"] <= a["epochs_trained"] and a["val_acc"] is not None for a in adapters)
    assert task["adapter_epochs"] == 5 * 1 + 3 * 3 and task["grid_adapter_epochs"] == 8 * 3
    val = [a["val_acc"] for a in adapters]
    ranked = sorted(range(8), key=lambda i: (-val[i], i))  # every adapter, pruned ones at their best epoch
    assert task["best"]["index"] == ranked[0] and task["ensemble"]["members"] == ranked[:2]
    assert len(task["loss_curve"]) == adapters[ranked[0]]["epochs_trained"]
    report = (out / "results.md").read_text()
    assert "| rung | after epoch | entered | pruned | went on |" in report and "| 1    | 1           | 8 " in report
    assert "14/24" in capsys.readouterr().out  # the summary's adapter-epochs: spent of the grid's
    assert not list(out.rglob("checkpoint.safetensors"))


def _run_train(tmp_path, *extra):
    out = tmp_path / "run"
    return train_main([*TINY_ARGS, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra]), out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--halving-rate", "1"), "--halving-rate: expected an integer >= 2, got 1"),
        (("--search", "random"), "--search: expected one of grid, halving, got 'random'"),
        (("--search", "halving", "--min-epochs", "5", "--epochs", "3"), "--min-epochs 5 is above --epochs 3"),
        (("--search", "halving", "--layers", "-1"), "--search halving chooses among adapters, and this grid has 1"),
    ],
)
def test_bad_search_settings_are_one_line(tmp_path, capsys, extra, message):
    code, out = _run_train(tmp_path, "--tasks", "synth-colour", "--epochs", "3", *extra)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert message in err.strip().splitlines()[-1], err
    assert not list(out.rglob("*.safetensors"))


def test_the_inca_probe_halves_over_layers_and_scores_each_at_its_best_val_epoch(tiny_backbone, monkeypatch):
    task = subset_task("digits", {"train": 96, "val": 48, "test": 48})
    histories = []
    train = bank_module.train_bank
    monkeypatch.setattr(bank_module, "train_bank", lambda *a, **k: histories.append(train(*a, **k)) or histories[-1])
    options = ProbeSuiteConfig(probes=["inca"], inca_search="halving", inca_epochs=3)
    result = probe_task(tiny_backbone, task, [0, 1, 2, 3], options)["results"]["inca"]
    assert sorted(result) == ["0", "1", "2", "3"] and all(0 <= s["val"] <= 1 for s in result.values())
    (history,) = histories
    assert history.rungs == [{"rung": 1, "epoch": 1, "entered": 4, "kept": 2}]
    assert probe_config(tiny_backbone, [0], options)["inca_search"] == "halving"
    assert "inca_search" not in probe_config(tiny_backbone, [0], ProbeSuiteConfig())  # as earlier reports recorded


@pytest.mark.slow
def test_every_rank_of_a_data_parallel_run_takes_the_same_rung_decisions(tmp_path):
    train = ["train", *TINY_ARGS, "--tasks", "synth-count", "--layers", "all", "--lr", "3e-3,1e-3",
             "--epochs", "3", "--search", "halving", "--cache", "always", "--batch-size", "16", "--out", "dp"]
    done = run_inca(*train, cwd=tmp_path, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    decisions = {}
    for line in done.stderr.splitlines():
        if "rung 1 after epoch 1" in line:
            rank = line.split("[rank ", 1)[1].split("/", 1)[0]
            decisions[rank] = line.split("rung 1 after epoch 1", 1)[1]
    assert set(decisions) == {"0", "1"} and decisions["0"] == decisions["1"]
    task = json.loads((tmp_path / "dp" / "results.json").read_text())["tasks"]["synth-count"]
    assert task["world_size"] == 2 and task["rungs"] == [{"rung": 1, "epoch": 1, "entered": 8, "kept": 3}]
    kept = [i for i, a in enumerate(task["adapters"]) if a["stopped_rung"] is None]
    assert decisions["0"].endswith(str(kept))


def test_the_inca_comparison_method_takes_the_search(tiny_backbone, monkeypatch, tmp_path):
    import inca.train.runner as runner
    from inca.methods import RunConfig, run_method

    histories = []
    monkeypatch.setattr(runner, "train_bank", lambda *a, **k: histories.append(train_bank(*a, **k)) or histories[-1])
    task = subset_task("synth-colour", {"train": 64, "val": 32, "test": 32})
    settings = RunConfig(epochs=3, batch_size=32, lr_grid=1, progress=False)
    result = run_method("inca", tiny_backbone, task, {"search": "halving", "layers": "all"}, settings, tmp_path)
    assert histories[0].rungs == [{"rung": 1, "epoch": 1, "entered": 4, "kept": 2}]
    assert result.best["epochs_trained"] in (1, 3) and 0 <= result.test_acc <= 1
