"""The method registry's contract, for every registered method: what ``apply`` trains, what init promises,
save/load round trips in the one adapter format, and typed ``--method-args`` with one-line errors."""

import dataclasses
import json
import re
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import inca.adapters.common as common
import inca.methods.run as run
from inca.activations import TensorBatches
from inca.adapters.common import CONFIG_FILE, WEIGHTS_FILE, count_parameters, head_parameters, set_trainable
from inca.errors import InCAError
from inca.inference import load_end_to_end, save_end_to_end
from inca.methods import (
    HEAD_INITS,
    METHODS,
    MethodConfig,
    RunConfig,
    TrainConfig,
    build_model,
    get_method,
    hparam,
    lr_candidates,
    methods_help,
    parse_method_args,
    probe_head,
    register_method,
    resolve_methods,
    run_method,
)
from inca.tasks import SPLITS
from inca.train.e2e import FitResult, trainable_copy

CLASSES = 4
SETTINGS = RunConfig(epochs=1, batch_size=8, seed=5, progress=False)
E2E = [name for name, method in METHODS.items() if method.apply is not None]
OVERRIDES = {"lora-ga": {"rank": 2, "init_batches": 2}}  # small enough for the tiny ViT and the test data
CASES = [(name, OVERRIDES.get(name, {})) for name in E2E] + [("linear", {"pool": "mean"})]
NORMS = r"(blocks\.\d+\.norm[12]|norm)\.(weight|bias)"
HEAD = r"head\.(weight|bias)"
TRAINS = {  # what each built-in method trains after apply (with its default config)
    "lora": rf"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.lora_[AB]|{HEAD}",
    "lora-ga": rf"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.lora_[AB]|{HEAD}",
    "compacter": rf"blocks\.\d+\.(attn|mlp)\.adapter\..+|{NORMS}|{HEAD}",
    "compacter++": rf"blocks\.\d+\.mlp\.adapter\..+|{NORMS}|{HEAD}",
    "full": r".+",
    "linear": HEAD,
}
KEEPS_OUTPUT = {  # the largest relative change of the pooled features at init each method promises
    "lora": 0.0,  # B = 0
    "lora-ga": 1e-4,  # the base weight absorbs s * B0 A0 (fp32 rounding)
    "compacter": 1e-3,  # the rule tensor starts at N(0, 1e-4)
    "compacter++": 1e-3,
    "full": 0.0,
    "linear": 0.0,
}


def case_id(case):
    name, overrides = case
    return "-".join([name, *(f"{k}={v}" for k, v in overrides.items() if name not in OVERRIDES)])


@pytest.fixture(scope="module")
def data() -> TensorBatches:
    """Random images and labels, enough rows for LoRA-GA's gradient batches."""
    g = torch.Generator().manual_seed(0)
    return TensorBatches(
        {split: torch.randn(16, 3, 32, 32, generator=g) for split in SPLITS},
        {split: torch.randint(0, CLASSES, (16,), generator=g) for split in SPLITS},
    )


def build(backbone, name: str, overrides: dict, data: TensorBatches, settings: RunConfig = SETTINGS) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return build_model(name, backbone, CLASSES, overrides, data, settings).eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", E2E)
def test_apply_trains_only_the_adapter_and_the_head(tiny_backbone, data, name):
    model = build(tiny_backbone, name, OVERRIDES.get(name, {}), data)
    assert name in TRAINS, f"declare in TRAINS what {name} trains"
    expected = {n for n, _ in model.named_parameters() if re.fullmatch(TRAINS[name], n)}
    assert trainable(model) == expected
    count, backbone = count_parameters(model), count_parameters(tiny_backbone.model)
    assert count.trainable >= count.total - backbone.total  # at least what the method adds trains
    assert all(p.requires_grad for p in head_parameters(model))


@pytest.mark.parametrize("name", E2E)
def test_init_keeps_the_backbone_features(tiny_backbone, data, name):
    model = build(tiny_backbone, name, OVERRIDES.get(name, {}), data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SETTINGS.seed)
        reference = trainable_copy(tiny_backbone, CLASSES, pool=get_method(name).make_config().head_pool).eval()
    x = images()
    expected, actual = features(reference, x), features(model, x)
    assert name in KEEPS_OUTPUT, f"declare in KEEPS_OUTPUT what {name} promises at init"
    tolerance = KEEPS_OUTPUT[name]
    if tolerance == 0.0:
        assert torch.equal(actual, expected)
    else:
        assert (actual - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_save_load_round_trip_onto_a_fresh_backbone_copy(tiny_backbone, data, tmp_path, monkeypatch, case):
    """Saved as inca-compare saves it: the method's ``save`` with the serving provenance signed in, whose
    weights are written once (not again to sign the provenance)."""
    name, overrides = case
    method = get_method(name)
    model = build(tiny_backbone, name, overrides, data)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    x = images()
    with torch.no_grad():
        expected = model(x)

    written = count_weight_writes(monkeypatch)
    save_end_to_end(name, model, tmp_path, tiny_backbone, [f"c{k}" for k in range(CLASSES)], None, {"task": "t"})
    assert written == [str(tmp_path / WEIGHTS_FILE)]
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["method"] in (name, "lora", "compacter") and config["trained_with"] == name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SETTINGS.seed + 1)  # another head: the saved one must replace it
        fresh = trainable_copy(tiny_backbone, CLASSES).eval()
    method.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert trainable(fresh) == trainable(model)


def count_weight_writes(monkeypatch) -> list[str]:
    """The weights files written from now on, one entry per write."""
    written, save_file = [], common.save_file

    def counted(tensors, path, metadata=None):
        written.append(str(Path(path).parent / WEIGHTS_FILE))  # the file the temporary one replaces
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(common, "save_file", counted)
    return written


def test_a_saved_end_to_end_model_is_refused_once_its_config_or_weights_are_edited(tiny_backbone, data, tmp_path,
                                                                                    monkeypatch):
    model = build(tiny_backbone, "linear", {}, data)
    save_end_to_end("linear", model, tmp_path, tiny_backbone, list("wxyz"), None, {"task": "t"})
    with monkeypatch.context() as patched:  # the config is read once: rebuilding and the method's load share it
        reads, read = [], common.read_json_file
        patched.setattr(common, "read_json_file", lambda path, *a: reads.append(path) or read(path, *a))
        loaded = load_end_to_end(tmp_path, tiny_backbone)
    assert reads == [tmp_path / CONFIG_FILE]
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))
    assert loaded.classes == list("wxyz") and loaded.metadata["task"] == "t"
    config_file, weights = tmp_path / CONFIG_FILE, tmp_path / WEIGHTS_FILE
    config, saved = config_file.read_text(), weights.read_bytes()
    config_file.write_text(config.replace('"task": "t"', '"task": "u"'))
    with pytest.raises(InCAError, match='was edited after it was saved .*task: "t" -> "u"'):
        load_end_to_end(tmp_path, tiny_backbone)
    config_file.write_text(config)
    weights.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    with pytest.raises(InCAError, match="does not match"):
        load_end_to_end(tmp_path, tiny_backbone)
    with pytest.raises(InCAError, match=r"sets \['method'\], which saving it for serving records"):
        save_end_to_end("linear", model, tmp_path / "n", tiny_backbone, list("wxyz"), None, {"method": "mine"})
    with (pytest.raises(InCAError, match="nothing was saved to .* through inca.adapters.common.write_adapter"),
          common.config_additions(tmp_path / "o", {"task": "t"})):
        common.write_adapter(tmp_path / "elsewhere", {"method": "full"}, {})


def test_loading_another_methods_adapter_is_a_clear_error(tiny_backbone, data, tmp_path):
    get_method("linear").save(build(tiny_backbone, "linear", {}, data), tmp_path)
    with pytest.raises(InCAError, match="holds a 'linear' adapter, not 'full'"):
        get_method("full").load(trainable_copy(tiny_backbone, CLASSES), tmp_path)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_hyper_parameter_is_typed_documented_and_json_ready(name):
    method = METHODS[name]
    defaults = method.defaults()
    assert json.loads(json.dumps(defaults)) == defaults
    assert method.make_config(defaults) == method.config() == method.make_config()
    assert resolve_methods(name) == {name: defaults}
    section = methods_help().split(f"\n  {name}: ", 1)[1].split("\n\n")[0]
    for key, field in method.config.fields().items():
        assert method.config.field_help(key) and field.metadata["source"], key
        assert f"    {key}=" in section, key


def test_method_args_are_typed_and_checked():
    methods = resolve_methods("lora,linear", ["lora.rank=4", "lora.lr=1e-3", "linear.pool=mean"])
    assert list(methods) == ["lora", "linear"]
    assert methods["lora"]["rank"] == 4 and methods["lora"]["lr"] == 1e-3 and methods["linear"]["pool"] == "mean"
    assert methods["lora"]["alpha"] == METHODS["lora"].defaults()["alpha"]
    assert parse_method_args({"compacter": {"reduction": 16}}) == {"compacter": {"reduction": 16}}
    inca = resolve_methods("inca", [{"inca": {"lr": "3e-3", "layers": [0, 2]}}, "inca.heads=2"])["inca"]
    assert inca["lr"] == [3e-3] and inca["layers"] == "0,2" and inca["heads"] == [2]
    assert resolve_methods("lora-ga", ["lora-ga.rslora=false"])["lora-ga"]["rslora"] is False
    for bad, word in [
        (["lora.rnk=4"], "'rnk' \\(did you mean rank\\?\\)"),
        (["nope.rank=4"], "unknown method 'nope'"),
        (["lora.rank=four"], "lora.rank expects a int like 8, got 'four'"),
        (["lora.rank=2.5"], "lora.rank"),
        (["lora.rslora=1"], "lora.rslora expects a bool"),
        (["inca.lr=[1e-3, x]"], "inca.lr expects a list of float"),
        (["lorarank=4"], "method.key=value"),
        (["lora.rank"], "method.key=value"),
        ({"lora": 4}, "method_args.lora must map"),
    ]:
        with pytest.raises(InCAError, match=word):
            parse_method_args(bad)
    with pytest.raises(InCAError, match="unknown method 'loar'.*did you mean lora"):
        resolve_methods("loar")
    with pytest.raises(InCAError, match="lora-ga.init_batches: expected a positive integer, got 0"):
        resolve_methods("lora-ga", ["lora-ga.init_batches=0"])
    with pytest.raises(InCAError, match="no methods given"):
        resolve_methods(" , ")


@dataclass(frozen=True, kw_only=True)
class BiasConfig(TrainConfig):
    lr: float = hparam(1e-3, source="test")


def _apply_bias(model: nn.Module, config: BiasConfig, context) -> None:
    set_trainable(model, [p for n, p in model.named_parameters() if n.endswith(".bias")])


def test_a_new_method_is_one_registration(tiny_backbone, data):
    try:
        register_method("biases", BiasConfig, "biases only (a test method)", apply=_apply_bias,
                        save=METHODS["full"].save, load=METHODS["full"].load)
        assert list(METHODS)[-1] == "biases" and "  biases: biases only" in methods_help()
        assert resolve_methods("biases", ["biases.lr=0.5"]) == {
            "biases": {"lr": 0.5, "weight_decay": 0.01, "warmup_ratio": 0.1, "max_grad_norm": 1.0, "schedule": "cosine"}
        }
        model = build(tiny_backbone, "biases", {}, data)
        assert trainable(model) == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
        with pytest.raises(ValueError, match="registered twice"):
            register_method("biases", BiasConfig, "again", apply=_apply_bias, save=print, load=print)
    finally:
        METHODS.pop("biases", None)


def test_registration_checks_the_config_and_the_functions():
    @dataclass(frozen=True, kw_only=True)
    class Undocumented(MethodConfig):
        size: int = 3

    @dataclass(frozen=True, kw_only=True)
    class NoDefault(TrainConfig):
        pass

    with pytest.raises(ValueError, match="'size' needs help and source"):
        register_method("undocumented", Undocumented, "x", run=print)
    with pytest.raises(ValueError, match="needs a default"):
        register_method("no-default", NoDefault, "x", run=print)
    with pytest.raises(ValueError, match="apply, save and load"):
        register_method("half", BiasConfig, "x", apply=_apply_bias)
    assert not {"undocumented", "no-default", "half"} & set(METHODS)


def test_inca_runs_on_the_shared_backbone_with_its_own_trainer():
    inca = METHODS["inca"]
    assert inca.shares_backbone and inca.run is not None and inca.apply is None
    assert not any(METHODS[name].shares_backbone for name in E2E)


def test_lora_ga_differs_from_lora_only_where_its_authors_do():
    lora, ga = METHODS["lora"].defaults(), METHODS["lora-ga"].defaults()
    assert {k for k in lora if lora[k] != ga[k]} == {"lr", "weight_decay", "warmup_ratio", "schedule", "rslora"}
    assert set(ga) - set(lora) == {"gamma", "direction", "scale", "init_batches"}
    assert (ga["weight_decay"], ga["warmup_ratio"], ga["max_grad_norm"]) == (0.0, 0.03, 1.0)
    assert (lora["alpha"], lora["weight_decay"]) == (16.0, 0.1)
    for name in E2E:
        assert METHODS[name].defaults()["max_grad_norm"] == 1.0, name
    assert METHODS["compacter"].defaults()["weight_decay"] == 0.0


def test_the_same_trainer_recipe_trains_lora_with_lora_gas_trainer_settings():
    """recipes/proxy-lora-same-trainer.yaml: LoRA as the LoRA-GA paper's baseline, every trainer setting LoRA-GA's,
    the same learning-rate grid; LoRA's own rank, alpha and scale."""
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "proxy-lora-same-trainer.yaml").read_text())
    methods = resolve_methods(recipe["methods"], recipe["method_args"])
    lora, ga = methods["lora"], methods["lora-ga"]
    trainer = ("lr", "weight_decay", "warmup_ratio", "schedule", "max_grad_norm")
    assert {k: lora[k] for k in trainer} == {k: ga[k] for k in trainer} == {
        "lr": 1e-4, "weight_decay": 0.0, "warmup_ratio": 0.03, "schedule": "cosine", "max_grad_norm": 1.0}
    assert (lora["rank"], lora["alpha"], lora["rslora"]) == (ga["rank"], ga["alpha"], False)
    grids = [[c.lr for c in get_method(m).make_config(methods[m]).tuning_grid(recipe["lr_grid"])] for m in methods]
    assert grids[0] == grids[1] and len(grids[0]) == 3


def test_lr_grid_is_log_spaced_around_the_default_and_compacter_also_tunes_its_reduction():
    assert lr_candidates(1e-3, 1) == [1e-3]
    assert lr_candidates(1e-3, 3) == pytest.approx([1e-3, 1e-3 / 3, 3e-3], rel=1e-5)
    assert lr_candidates(1e-3, 4) == pytest.approx([1e-3, 1e-3 / 3, 3e-3, 9e-3], rel=1e-5)
    lora = get_method("lora").make_config()
    assert [c.lr for c in lora.tuning_grid(2)] == pytest.approx([5e-4, 1.5e-3])
    compacter = get_method("compacter").make_config()
    assert compacter.tuning_grid(1) == [compacter]
    grid = compacter.tuning_grid(3)
    assert grid[0] == compacter and len(grid) == 9
    assert {(c.lr, c.reduction) for c in grid} == {(lr, r) for lr in lr_candidates(3e-3, 3) for r in (32, 16, 8)}
    with pytest.raises(InCAError, match="--lr-grid must be at least 1"):
        lr_candidates(1e-3, 0)
    with pytest.raises(InCAError, match="RunConfig.lr_grid: expected a positive integer, got 0"):
        RunConfig(lr_grid=0)
    with pytest.raises(InCAError, match="RunConfig.head_init: expected one of linear-probe, random, zero, got 'ones'"):
        RunConfig(head_init="ones")


@pytest.mark.parametrize("head_init", HEAD_INITS)
def test_the_head_starts_as_the_protocol_says_and_the_adapters_do_not_care(tiny_backbone, data, head_init):
    settings = dataclasses.replace(SETTINGS, head_init=head_init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SETTINGS.seed)
        model = build_model("lora", tiny_backbone, CLASSES, {}, data, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SETTINGS.seed)
        drawn = trainable_copy(tiny_backbone, CLASSES)
    head = model.get_classifier().state_dict()
    expected = {
        "zero": {k: torch.zeros_like(v) for k, v in head.items()},
        "random": drawn.get_classifier().state_dict(),
        "linear-probe": head_init == "linear-probe" and probe_head(drawn, data, settings),
    }[head_init]
    assert all(torch.equal(head[k], expected[k]) for k in head)
    random_start = build(tiny_backbone, "lora", {}, data, dataclasses.replace(SETTINGS, head_init="random"))
    for (name, p), q in zip(model.named_parameters(), random_start.parameters()):
        if "lora_" in name:
            assert torch.equal(p, q), name  # the head's start draws nothing: adapters start the same


def test_lora_ga_refuses_a_zero_head(tiny_backbone, data):
    with pytest.raises(InCAError, match="zero-initialised head"):
        build_model("lora-ga", tiny_backbone, CLASSES, OVERRIDES["lora-ga"], data,
                    dataclasses.replace(SETTINGS, head_init="zero"))


def test_the_lr_grid_keeps_the_best_on_val_and_ties_keep_the_default(monkeypatch, tmp_path):
    scripted = {5e-4: 0.5, 5e-4 / 3: 0.7, 1.5e-3: 0.7}
    trained = []

    def fake_train(name, backbone, task, config, settings, head=None, log=None):
        trained.append(config.lr)
        acc = scripted[min(scripted, key=lambda lr: abs(lr - config.lr))]
        return nn.Linear(2, 2), FitResult(acc / 2, acc, 1, [acc], [1.0], 1)

    monkeypatch.setattr(run, "train_e2e", fake_train)
    monkeypatch.setattr(run, "save_end_to_end", lambda *args: None)  # a stand-in model has nothing to save
    task = types.SimpleNamespace(spec="fake", name="fake", num_classes=2, classes=["a", "b"])
    settings = RunConfig(epochs=1, head_init="random", lr_grid=3, progress=False)
    metrics = run_method("lora", None, task, {}, settings, tmp_path)
    assert trained == pytest.approx([5e-4, 5e-4 / 3, 1.5e-3], rel=1e-5)
    assert metrics.tuned["lr"] == pytest.approx(5e-4 / 3, rel=1e-5) and metrics.val_acc == 0.7
    assert [g["val_acc"] for g in metrics.grid] == [0.5, 0.7, 0.7]
