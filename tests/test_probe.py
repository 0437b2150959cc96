import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import inca.probe_report
from inca.backbone import create_backbone
from inca.cli import probe_main, probe_parser, train_main
from inca.config import hparam
from inca.errors import InCAError
from inca.io import digest
from inca.options import POOLS
from inca.probe import (
    layers_from_report,
    probe_config,
    probe_task,
    render_probe_report,
    run_probe_suite,
    summary_lines,
)
from inca.probes import PROBES, READS, ProbeConfig, ProbeSuiteConfig, register_probe
from inca.probes.knn import KNNProbeConfig, knn_predict
from inca.probes.ranking import RANK_BY, rank_by_probe, tied_with_best
from inca.tasks import SPLITS, image_loader, load_task, sequential_batches

from .conftest import TINY_ARGS, TINY_KWARGS, subset_task


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def _timm_features(backbone, split, layer):
    """Independent of the probe code: timm's forward_intermediates, CLS token and mean of patches."""
    cls, mean = [], []
    for images, _ in image_loader(split, backbone.transform, sequential_batches(0, len(split), 100)):
        with torch.no_grad():
            spatial, prefix = backbone.model.forward_intermediates(
                images, indices=[layer], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
            )[0]
        cls.append(prefix[:, 0])
        mean.append(spatial.mean(1))
    return torch.cat(cls).numpy(), torch.cat(mean).numpy()


def test_linear_probe_equals_direct_sklearn_fit(tiny_backbone, digits):
    result = probe_task(tiny_backbone, digits, [1, 3], ProbeSuiteConfig(probes=["linear"]))
    for layer in (1, 3):
        features = {s: _timm_features(tiny_backbone, digits.splits[s], layer) for s in SPLITS}
        for p, pool in enumerate(("cls", "mean")):
            reported = result["results"][f"linear/{pool}"][str(layer)]
            scaler = StandardScaler().fit(features["train"][p])
            with threadpool_limits(1):  # small problems: many BLAS threads only contend
                model = LogisticRegression(C=reported["C"], max_iter=2000).fit(
                    scaler.transform(features["train"][p]), digits.splits["train"].labels)
            for split in ("val", "test"):
                predicted = model.predict(scaler.transform(features[split][p]))
                accuracy = (predicted == digits.splits[split].labels).mean()
                assert abs(accuracy - reported[split]) <= 1 / len(predicted) + 1e-9, (layer, pool, split)


def test_knn_equals_brute_force():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 300)
    train[:, 0] += labels
    queries = rng.normal(size=(80, 16)).astype(np.float32)
    queries[:, 0] += rng.integers(0, 5, 80)
    got = knn_predict(train, labels, queries, 5, k=20, temperature=0.07)
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = q @ a.T
    neighbours = np.argsort(-similarity, axis=1)[:, :20]
    votes = np.zeros((80, 5))
    for i in range(80):
        for j in neighbours[i]:
            votes[i, labels[j]] += np.exp(similarity[i, j] / 0.07)
    assert np.array_equal(got, votes.argmax(1))


def test_knn_leaves_its_inputs_unchanged():
    rng = np.random.default_rng(0)
    train, queries = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(10, 8)).astype(np.float32)
    before = train.copy(), queries.copy()
    knn_predict(train, rng.integers(0, 3, 40), queries, 3, k=5, temperature=0.1)
    assert np.array_equal(train, before[0]) and np.array_equal(queries, before[1])


def test_probe_order_changes_no_result(tiny_backbone, digits):
    """The probes share the recorded features: kNN first must not leave them L2-normalised for the linear probe."""
    knn_first = probe_task(tiny_backbone, digits, [1], ProbeSuiteConfig(probes=["knn", "linear"], linear_c=[1.0]))
    linear_first = probe_task(tiny_backbone, digits, [1], ProbeSuiteConfig(probes=["linear", "knn"], linear_c=[1.0]))
    assert set(knn_first["results"]) == {"knn/cls", "knn/mean", "linear/cls", "linear/mean"}
    for key in ("results", "best_layers", "rankings"):
        assert knn_first[key] == linear_first[key], key


def test_probe_suite_resumes_and_refuses_another_configuration(tmp_path, tiny_backbone, digits):
    loaded = []

    def load(spec):
        loaded.append(spec)
        return digits if spec == "digits" else load_task(spec)

    options = ProbeSuiteConfig(probes=["knn"], pools=["mean"])
    first = run_probe_suite(tiny_backbone, ["digits"], "-1", options, tmp_path, load)
    # Not the configuration: where activations come from and how much memory may hold them.
    same = ProbeSuiteConfig(probes=["knn"], pools=["mean"], memory_budget_gb=0, num_workers=0)
    second = run_probe_suite(tiny_backbone, ["digits", "synth-colour"], "-1", same, tmp_path, load)
    assert loaded == ["digits", "digits", "synth-colour"]  # digits is loaded to check its data, not probed again
    assert list(second["tasks"]) == ["digits", "synth-colour"]
    assert second["tasks"]["digits"] == first["tasks"]["digits"]
    assert json.loads((tmp_path / "probe.json").read_text()) == second
    other = ProbeSuiteConfig(probes=["knn"], pools=["mean"], k=5)
    with pytest.raises(InCAError, match="another configuration \\(differs in k\\).*--overwrite"):
        run_probe_suite(tiny_backbone, ["digits"], "-1", other, tmp_path, load)
    with pytest.raises(InCAError, match="differs in layers"):
        run_probe_suite(tiny_backbone, ["digits"], "0", options, tmp_path, load)
    replaced = run_probe_suite(tiny_backbone, ["digits"], "-1", other, tmp_path, load, overwrite=True)
    assert replaced["config"]["k"] == 5 and list(replaced["tasks"]) == ["digits"]


def test_one_backbone_pass_feeds_every_layer(tiny_backbone, digits):
    options = ProbeSuiteConfig(probes=["linear", "knn", "inca"], inca_epochs=2, linear_c=[1.0])
    one = probe_task(tiny_backbone, digits, [3], options)["backbone_forward_calls"]
    every = probe_task(tiny_backbone, digits, [0, 1, 2, 3], options)["backbone_forward_calls"]
    assert one == every
    # Train, val and test each once: the second InCA epoch reads the tokens kept in memory.
    assert one == sum(-(-n // options.batch_size) for n in digits.sizes().values())


def test_streaming_epochs_without_memory(tiny_backbone, digits):
    options = ProbeSuiteConfig(probes=["inca"], inca_epochs=2, memory_budget_gb=0)
    calls = probe_task(tiny_backbone, digits, [0, 3], options)["backbone_forward_calls"]
    # The second epoch streams train again, and val again to pick each layer's best epoch.
    again = sum(-(-digits.sizes()[split] // options.batch_size) for split in ("train", "val"))
    assert calls == sum(-(-n // options.batch_size) for n in digits.sizes().values()) + again


@pytest.mark.slow
def test_probe_cli_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "probe"
    assert probe_main([*TINY_ARGS, "--tasks", "digits,synth-colour", "--out", str(out), "--linear-c", "1"]) == 0
    printed = capsys.readouterr().out
    assert "digits: inca" in printed and "best layer" in printed
    report = json.loads((out / "probe.json").read_text())
    digits_result = report["tasks"]["digits"]
    assert set(digits_result["results"]) == {"inca", "linear/cls", "linear/mean", "knn/cls", "knn/mean"}
    for key, by_layer in digits_result["results"].items():
        best = digits_result["best_layers"][key][0]
        assert by_layer[str(best)]["val"] == max(v["val"] for v in by_layer.values())
        assert by_layer[str(best)]["test"] > 0.3, key  # chance is 0.1
    assert "**" in (out / "probe.md").read_text()
    for png in ("probe.png", "probe_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = tmp_path / "run"
    reads, read = [], inca.probe_report.read_json_file  # probe.json read once, when the input is checked
    monkeypatch.setattr(inca.probe_report, "read_json_file", lambda p, *a, **k: reads.append(p) or read(p, *a, **k))
    assert train_main([*TINY_ARGS, "--tasks", "digits", "--layers", "best:2", "--probe-report",
                       str(out / "probe.json"), "--epochs", "1", "--out", str(run)]) == 0
    assert reads == [str(out / "probe.json")]
    trained = json.loads((run / "results.json").read_text())["tasks"]["digits"]["layers"]
    assert trained == sorted(digits_result["rankings"][RANK_BY]["ranking"][:2])


# Val accuracies chosen by hand: linear's best pooling ties layers 1, 2 and 3 at 0.9 (their mean over the poolings
# breaks the tie: 3, then 2, then 1); the InCA probe ties 0, 1 and 3 (the shallower first) and diverged on 2.
HAND_RESULTS = {
    "linear/cls": {"0": {"val": 0.8, "test": 0.9}, "1": {"val": 0.9, "test": 0.1}, "2": {"val": 0.9, "test": 0.2},
                   "3": {"val": 0.7, "test": 0.3}},
    "linear/mean": {"0": {"val": 0.85, "test": 0.9}, "1": {"val": 0.5, "test": 0.1}, "2": {"val": 0.6, "test": 0.2},
                    "3": {"val": 0.9, "test": 0.3}},
    "inca": {"0": {"val": 0.6, "test": 0.1}, "1": {"val": 0.6, "test": 0.9}, "2": {"val": float("nan"), "test": 0.9},
             "3": {"val": 0.6, "test": 0.2}},
}


def test_rankings_read_val_only_show_ties_and_break_them_by_the_stated_rule():
    linear, inca = rank_by_probe(HAND_RESULTS, "linear"), rank_by_probe(HAND_RESULTS, "inca")
    assert (linear.ranking, linear.text) == ([3, 2, 1, 0], "3 = 2 = 1 > 0")
    assert (inca.ranking, inca.text) == ([0, 1, 3, 2], "0 = 1 = 3 > 2")
    assert linear.best(2) == [2, 3] and inca.best(2) == [0, 1]
    assert tied_with_best(HAND_RESULTS["linear/cls"]) == [1, 2] and tied_with_best(HAND_RESULTS["inca"]) == [0, 1, 3]
    upside_down = {key: {layer: {**score, "test": 1 - score["test"]} for layer, score in by_layer.items()}
                   for key, by_layer in HAND_RESULTS.items()}
    assert rank_by_probe(upside_down, "linear") == linear  # test accuracy never enters a ranking


def _hand_report(tiny_backbone):
    results = HAND_RESULTS
    return {"backbone": tiny_backbone.describe(), "tasks": {"digits": {
        "layers": [0, 1, 2, 3], "results": results,
        "best_layers": {key: tied_with_best(by_layer) for key, by_layer in results.items()},
        "rankings": {name: rank_by_probe(results, name).to_dict() for name in ("linear", "inca")}}}}


def test_reports_show_ties_and_say_what_ranked_the_layers(tiny_backbone):
    report = _hand_report(tiny_backbone)
    text = render_probe_report(report)
    linear_cls = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
                  if line.startswith("| ") and not line.startswith("| layer")}
    assert linear_cls == {"0": "0.800 / 0.900", "1": "**0.900 / 0.100**", "2": "**0.900 / 0.200**",
                          "3": "0.700 / 0.300"}  # both tied layers bold
    assert "- linear" in text and ": 3 = 2 = 1 > 0" in text and "- inca" in text and ": 0 = 1 = 3 > 2" in text
    assert f"`--rank-by` default: {RANK_BY}" in text and "broken by the probe's mean val accuracy" in text
    lines = summary_lines(report)
    assert "digits: linear/cls   best layer   1  val 0.900  test 0.100 (tied with 2)" in lines
    assert "digits: inca         best layer   0  val 0.600  test 0.100 (tied with 1, 3)" in lines


def test_best_layers_follow_the_chosen_probe_of_the_report(tmp_path, tiny_backbone):
    report = tmp_path / "probe.json"
    report.write_text(json.dumps(_hand_report(tiny_backbone)))
    digits = load_task("digits")
    assert layers_from_report("best:2", 4, str(report), "linear")(digits) == [2, 3]
    assert layers_from_report("best:2", 4, str(report), "inca")(digits) == [0, 1]
    assert layers_from_report("best:1", 4, str(report))(digits) == rank_by_probe(HAND_RESULTS, RANK_BY).best(1)
    with pytest.raises(InCAError, match="has no knn probe results for 'digits' .*--rank-by"):
        layers_from_report("best:2", 4, str(report), "knn")  # before any task trains
    with pytest.raises(InCAError, match="--rank-by: expected a probe, one of linear, knn, inca, got 'svm'"):
        layers_from_report("best:2", 4, str(report), "svm")
    with pytest.raises(InCAError, match="has no task 'synth-colour'"):
        layers_from_report("best:2", 4, str(report))(load_task("synth-colour"))
    with pytest.raises(InCAError, match="does not exist"):
        layers_from_report("best:2", 4, str(tmp_path / "none.json"))
    report.write_text(json.dumps({"tasks": {"digits": {"ranking": [3, 1, 0, 2]}}}))
    with pytest.raises(InCAError, match="no valid probe results; probe it again"):
        layers_from_report("best:2", 4, str(report))


def test_inca_probe_scores_each_layer_at_its_best_val_epoch(tiny_backbone, monkeypatch):
    """Against the weights each epoch ended with, evaluated here by a plain forward pass of timm's activations."""
    import copy

    import inca.adapters.inca as adapters
    from inca.activations import RecordingSource

    banks, epochs = [], []

    class Watched(adapters.InCABank):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            banks.append(self)

    record = RecordingSource.loader

    def loader(self, split, batches):
        if split == "val":  # each epoch ends with a pass over val: the weights it ended with
            epochs.append(copy.deepcopy(banks[-1].state_dict()))
        return record(self, split, batches)

    monkeypatch.setattr(adapters, "InCABank", Watched)
    monkeypatch.setattr(RecordingSource, "loader", loader)
    task = subset_task("digits", {"train": 160, "val": 60, "test": 60})
    layers = [0, 3]
    scores = probe_task(tiny_backbone, task, layers, ProbeSuiteConfig(probes=["inca"], inca_epochs=4,
                                                                    inca_lr=0.05))["results"]["inca"]
    assert len(epochs) == 4
    bank = copy.deepcopy(banks[-1])
    accuracy = {}
    for split in ("val", "test"):
        tokens = {layer: [] for layer in layers}
        for images, _ in image_loader(task.splits[split], tiny_backbone.transform,
                                      sequential_batches(0, len(task.splits[split]), 64)):
            with torch.no_grad():
                out = tiny_backbone.model.forward_intermediates(images, indices=layers, output_fmt="NLC",
                                                                intermediates_only=True, return_prefix_tokens=True)
            for layer, (patches, prefix) in zip(layers, out):
                tokens[layer].append(torch.cat([prefix, patches], 1))
        features = {layer: torch.cat(parts) for layer, parts in tokens.items()}
        labels = torch.as_tensor(task.splits[split].labels)
        per_epoch = []
        for state in epochs:
            bank.load_state_dict(state)
            with torch.no_grad():
                per_epoch.append((bank(features).argmax(-1) == labels).float().mean(1).tolist())
        accuracy[split] = np.array(per_epoch)  # [epoch, adapter]
    best = [int(np.argmax(accuracy["val"][:, i])) for i in range(len(layers))]  # the first of equal epochs
    for i, layer in enumerate(layers):
        reported = scores[str(layer)]
        assert reported["best_epoch"] == best[i] + 1
        assert reported["val"] == pytest.approx(accuracy["val"][best[i], i], abs=1e-6)
        assert reported["test"] == pytest.approx(accuracy["test"][best[i], i], abs=1e-6)
    assert any(epoch < 3 for epoch in best), "every layer peaked at the last epoch: the test shows nothing"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [(["--probes", "svm"], "unknown probe 'svm'; choose from linear, knn, inca"),
     (["--pool", "max"], "inca-probe.pools: expected one of cls, mean, got 'max'"),
     (["--k", "0"], "--k: expected a positive integer")],
)
def test_probe_bad_input(tmp_path, capsys, args, message):
    import re

    assert probe_main([*TINY_ARGS, "--tasks", "digits", "--out", str(tmp_path), *args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("inca-probe: error:") and re.search(message, last)


@pytest.mark.slow
def test_probe_cli_resumes_and_overwrites(tmp_path, capsys, caplog):
    args = [*TINY_ARGS, "--tasks", "digits", "--out", str(tmp_path), "--probes", "knn", "--layers", "-1"]
    assert probe_main(args) == 0
    with caplog.at_level("INFO"):
        assert probe_main(args) == 0
    assert "digits: finished in an earlier run, skipped" in caplog.text
    capsys.readouterr()
    assert probe_main([*args, "--k", "5"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("inca-probe: error:") and "differs in k" in last and "--overwrite" in last
    assert probe_main([*args, "--k", "5", "--overwrite"]) == 0
    assert json.loads((tmp_path / "probe.json").read_text())["config"]["k"] == 5


def test_final_norm_reaches_the_last_block_only_and_is_recorded_only_when_on(tiny_backbone):
    normed = create_backbone("vit_tiny_patch16_224", "random", TINY_KWARGS, final_norm=True)
    x = torch.randn(2, 3, 32, 32)
    raw, out = tiny_backbone.extract(x, [2, 3]), normed.extract(x, [2, 3])
    assert torch.equal(raw[2], out[2])
    with torch.no_grad():
        torch.testing.assert_close(out[3], tiny_backbone.model.norm(raw[3]))
    assert "final_norm" not in tiny_backbone.describe() and normed.describe()["final_norm"] is True
    unchanged = {"name": tiny_backbone.name, "model_kwargs": tiny_backbone.model_kwargs,
                 "weights_hash": tiny_backbone.weights_hash, "preprocessing": tiny_backbone.preprocessing}
    assert tiny_backbone.fingerprint == digest(unchanged) != normed.fingerprint
    assert "through the backbone's final norm" in render_probe_report({"backbone": normed.describe(), "tasks": {}})
    assert "no final norm" in render_probe_report({"backbone": tiny_backbone.describe(), "tasks": {}})


@dataclass(frozen=True, kw_only=True)
class CentroidConfig(ProbeConfig):
    shrink: float = hparam(0.0, help="pull each class mean this far towards the mean of all rows", source="a test")


def _nearest_centroid(features, labels, num_classes, config, run):
    scores = {}
    for layer, train in features["train"].items():
        centroids = np.stack([train[labels["train"] == c].mean(0) for c in range(num_classes)])
        centroids = (1 - config.shrink) * centroids + config.shrink * train.mean(0)
        scores[layer] = {
            split: float((np.linalg.norm(features[split][layer][:, None] - centroids, axis=-1).argmin(1)
                          == labels[split]).mean())
            for split in ("val", "test")
        }
    return scores


def test_a_new_probe_is_one_registration(tmp_path, capsys):
    try:
        register_probe("centroid", CentroidConfig, "nearest class mean of pooled features (a test probe)",
                       fit=_nearest_centroid)
        assert list(PROBES)[-1] == "centroid"
        help_text = " ".join(probe_parser().format_help().split())
        assert "nearest class mean of pooled features (a test probe)" in help_text
        assert "--centroid-shrink FLOAT pull each class mean" in help_text
        args = [*TINY_ARGS, "--tasks", "digits", "--out", str(tmp_path), "--probes", "centroid,knn", "--layers", "-1"]
        assert probe_main([*args, "--centroid-shrink", "0.5"]) == 0
        assert "digits: centroid/cls" in capsys.readouterr().out
        report = json.loads((tmp_path / "probe.json").read_text())
        assert report["probes"] == ["centroid", "knn"] and report["config"]["centroid_shrink"] == 0.5
        result = report["tasks"]["digits"]
        assert list(result["results"]) == ["centroid/cls", "centroid/mean", "knn/cls", "knn/mean"]
        assert result["results"]["centroid/mean"]["3"]["test"] > 0.2  # chance is 0.1
        assert "centroid/cls (val / test)" in (tmp_path / "probe.md").read_text()
        assert probe_main([*args, "--centroid-shrink", "0"]) == 2  # another configuration
        assert "differs in centroid_shrink" in capsys.readouterr().err
        with pytest.raises(ValueError, match="registered twice"):
            register_probe("centroid", CentroidConfig, "again", fit=_nearest_centroid)
    finally:
        PROBES.pop("centroid", None)
    assert "--centroid-shrink" not in probe_parser().format_help()


def test_registration_checks_the_config_names_and_reads():
    @dataclass(frozen=True, kw_only=True)
    class Undocumented(ProbeConfig):
        size: int = 3

    @dataclass(frozen=True, kw_only=True)
    class Size(ProbeConfig):
        size: int = hparam(3, help="a size", source="a test")

    with pytest.raises(ValueError, match="'size' needs help and source"):
        register_probe("undocumented", Undocumented, "x", fit=_nearest_centroid)
    with pytest.raises(ValueError, match="reads must be one of pooled, tokens"):
        register_probe("pixels", Size, "x", fit=_nearest_centroid, reads="images")
    with pytest.raises(ValueError, match=r"settings \['batch_size'\] are already named"):
        register_probe("batch", Size, "x", fit=_nearest_centroid)  # batch_size: a shared setting's name
    with pytest.raises(ValueError, match=r"settings \['k', 'temperature'\] are already named"):
        register_probe("neighbours", KNNProbeConfig, "x", fit=_nearest_centroid, prefix="")  # kNN's
    assert not {"undocumented", "pixels", "batch", "neighbours"} & set(PROBES)


@pytest.mark.parametrize("name", list(PROBES))
def test_every_probe_is_documented_and_runs_on_a_tiny_task(name, tiny_backbone):
    probe = PROBES[name]
    assert probe.reads in READS and probe.summary
    help_text = probe_parser().format_help()
    for key in probe.config.fields():
        assert probe.config.field_help(key) and probe.config.field_source(key), key
        assert f"--{probe.key(key)}".replace("_", "-") in help_text, key
    options = ProbeSuiteConfig(probes=[name])
    assert json.loads(json.dumps(options.to_dict())) == options.to_dict()
    task = subset_task("digits", {"train": 100, "val": 50, "test": 50})
    result = probe_task(tiny_backbone, task, [0, 3], options)
    keys = [name] if probe.reads == "tokens" else [f"{name}/{pool}" for pool in POOLS]
    assert list(result["results"]) == keys
    for key in keys:
        assert set(result["results"][key]) == {"0", "3"}
        assert all(0 <= score[split] <= 1 for score in result["results"][key].values() for split in ("val", "test"))
    assert sorted(result["rankings"][name]["ranking"]) == [0, 3]


def test_probe_json_keys_and_flags_are_those_of_earlier_reports(tiny_backbone):
    """A rerun into an earlier run's directory with the same flags matches its recorded configuration."""
    config = probe_config(tiny_backbone, [0], ProbeSuiteConfig())
    assert {k: v for k, v in config.items() if k not in ("backbone", "layers")} == {
        "probes": ["linear", "knn", "inca"], "pools": ["cls", "mean"], "k": 20, "temperature": 0.07,
        "linear_c": [0.01, 0.1, 1.0, 10.0], "inca_lr": 3e-3, "inca_epochs": 5, "batch_size": 64, "seed": 0,
        "inca_scored_at": "best-val-epoch",  # reports of the InCA probe's last epoch are another configuration
    }
    assert "inca_scored_at" not in probe_config(tiny_backbone, [0], ProbeSuiteConfig(probes=["knn"]))
    args = probe_parser().parse_args(["--probes", "knn,inca", "--pool", "mean", "--k", "5", "--temperature", "0.1",
                                      "--linear-c", "0.1,1", "--inca-epochs", "2", "--inca-lr", "1e-3",
                                      "--batch-size", "8", "--seed", "3", "--memory-budget-gb", "0"])
    assert (args.probes, args.pool, args.k, args.temperature, args.inca_epochs, args.inca_lr) == (
        "knn,inca", "mean", 5, 0.1, 2, 1e-3)
    assert [c for item in args.linear_c for c in item] == [0.1, 1.0]
    assert (args.batch_size, args.seed, args.memory_budget_gb) == (8, 3, 0.0)
    with pytest.raises(InCAError, match="unknown probe setting 'kk' \\(did you mean k\\?\\)"):
        ProbeSuiteConfig(kk=5)
    with pytest.raises(InCAError, match="knn.k: expected a positive integer"):
        ProbeSuiteConfig(k=0)


def test_probe_modules_import_nothing_heavy_and_keep_their_order():
    import subprocess
    import sys

    script = ("import sys; import inca.probes.inca; from inca.probes import PROBES; print(list(PROBES)); "
              "print(sorted({'torch', 'faiss', 'sklearn'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["['linear', 'knn', 'inca']", "[]"]
