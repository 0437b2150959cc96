"""Images -> logits: InCAClassifier, MultiTaskInCA (one backbone pass for many tasks), ensembles, saved
adapters, and inca-predict serving several tasks at once."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inca import InCA, InCAClassifier, MultiTaskInCA, TaskAdapter, load_adapter, save_adapter
from inca.adapters.common import WEIGHTS_FILE
from inca.cli import predict_main
from inca.errors import InCAError

from .conftest import randomise


def manual_tokens(model: torch.nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """Block ``layer``'s output computed by hand from timm's parts: an independent reference."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for block in model.blocks[: layer + 1]:
        x = block(x)
    return x


def adapter_for(backbone, layer: int, classes: int, seed: int, task: str = "t") -> TaskAdapter:
    inca = randomise(InCA(backbone.width, classes, backbone.num_heads, seed=seed), seed=seed)
    return TaskAdapter([inca], [layer], [f"c{i}" for i in range(classes)],
                       {"backbone": backbone.describe(), "task": task})


@pytest.fixture
def images():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_classifier_equals_adapter_on_hand_computed_tokens(tiny_backbone, images):
    adapter = randomise(InCA(tiny_backbone.width, 7, tiny_backbone.num_heads))
    model = InCAClassifier(tiny_backbone, layer=-2, adapter=adapter)
    assert model.layer == tiny_backbone.num_blocks - 2
    with torch.no_grad():
        expected = adapter(manual_tokens(tiny_backbone.model, images, model.layer))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_classifier_trains_only_the_adapter_and_keeps_the_backbone_in_eval(tiny_backbone, images):
    adapter = InCA(tiny_backbone.width, 3, tiny_backbone.num_heads, seed=0)
    model = InCAClassifier(tiny_backbone, 1, adapter).train()
    assert not tiny_backbone.model.training and model.adapter.training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    for _ in range(2):
        loss = F.cross_entropy(model(images), torch.tensor([0, 1, 2, 0, 1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in tiny_backbone.model.state_dict().items())
    assert not torch.equal(adapter.head.weight, torch.zeros_like(adapter.head.weight))


def test_classifier_compiles_and_exports(tiny_backbone, images):
    model = InCAClassifier(tiny_backbone, 2, randomise(InCA(tiny_backbone.width, 4, 3))).eval()
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
    torch.testing.assert_close(compiled, eager)
    exported = torch.export.export(model, (images,))
    torch.testing.assert_close(exported.module()(images), eager)


def test_multitask_equals_each_adapter_alone_with_one_pass_to_the_deepest_layer(tiny_backbone, images):
    adapters = {"a": adapter_for(tiny_backbone, 0, 3, 1), "b": adapter_for(tiny_backbone, 2, 5, 2),
                "c": adapter_for(tiny_backbone, 2, 4, 3)}
    model = MultiTaskInCA(tiny_backbone, adapters)
    calls = [0] * tiny_backbone.num_blocks
    hooks = [block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, block in enumerate(tiny_backbone.model.blocks)]
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [1, 1, 1, 0]  # blocks 0..2 once each; block 3 is never run
    assert list(out) == ["a", "b", "c"]
    with torch.no_grad():
        for task, adapter in adapters.items():
            alone = InCAClassifier(tiny_backbone, adapter.layers[0], adapter.members[0])(images)
            torch.testing.assert_close(out[task], alone, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(model, (images,))
    torch.testing.assert_close(exported.module()(images), out)


def test_ensemble_averages_probabilities(tiny_backbone, images):
    members = [randomise(InCA(tiny_backbone.width, 4, 3), seed=s) for s in range(3)]
    ensemble = TaskAdapter(members, [0, 3, 1], list("abcd"))
    with torch.no_grad():
        out = MultiTaskInCA(tiny_backbone, {"e": ensemble})(images)["e"]
        tokens = [manual_tokens(tiny_backbone.model, images, layer) for layer in (0, 3, 1)]
        probs = [m(z).softmax(-1) for m, z in zip(members, tokens)]
    torch.testing.assert_close(out.softmax(-1), torch.stack(probs).mean(0), rtol=1e-5, atol=1e-6)


def test_saved_adapter_round_trip_and_damage(tiny_backbone, tmp_path):
    ensemble = TaskAdapter([randomise(InCA(192, 3, 3, 2, mlp_ratio=1.0), seed=s) for s in (0, 1)], [1, 3], list("xyz"),
                           {"task": "t", "backbone": tiny_backbone.describe()}, [{"lr": 1e-3}, {"lr": 3e-3}])
    save_adapter(ensemble, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    z = {1: torch.randn(2, 17, 192), 3: torch.randn(2, 17, 192)}
    assert torch.equal(loaded(z), ensemble(z))
    assert loaded.layers == [1, 3] and loaded.classes == list("xyz") and loaded.metadata["task"] == "t"
    assert loaded.member_info == [{"lr": 1e-3}, {"lr": 3e-3}]
    weights = tmp_path / "a" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(InCAError, match="does not match"):
        load_adapter(tmp_path / "a")
    with pytest.raises(InCAError, match="not a saved adapter"):
        load_adapter(tmp_path / "missing")
    with pytest.raises(InCAError, match="may not set"):
        TaskAdapter([InCA(192, 3, 3)], [0], list("xyz"), {"classes": ["q"]})


def test_adapters_of_other_backbones_are_refused(tiny_backbone):
    other = {**tiny_backbone.describe(), "weights_hash": "0" * 16}
    good = adapter_for(tiny_backbone, 1, 3, 0)
    stranger = TaskAdapter([InCA(192, 3, 3)], [1], list("abc"), {"backbone": other})
    with pytest.raises(InCAError, match="different backbones"):
        MultiTaskInCA(tiny_backbone.model, {"a": good, "b": stranger})
    with pytest.raises(InCAError, match="other weights"):
        MultiTaskInCA(tiny_backbone, {"b": stranger})
    with pytest.raises(InCAError, match="width"):
        MultiTaskInCA(tiny_backbone, {"w": TaskAdapter([InCA(96, 3, 3)], [1], list("abc"))})
    with pytest.raises(InCAError, match="blocks"):
        MultiTaskInCA(tiny_backbone, {"d": TaskAdapter([InCA(192, 3, 3)], [7], list("abc"))})


@pytest.mark.slow
def test_predict_cli_serves_several_tasks_in_one_table(tiny_backbone, tmp_path, capsys):
    for task, layer, classes, seed in (("digits", 1, 3, 0), ("shapes", 3, 4, 1)):
        save_adapter(adapter_for(tiny_backbone, layer, classes, seed, task), tmp_path / task)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    adapters = ["--adapter", str(tmp_path / "digits"), "--adapter", str(tmp_path / "shapes")]
    assert predict_main([*adapters, "--images", str(tmp_path), "--device", "cpu", "--output",
                         str(tmp_path / "out.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [r["path"] for r in rows] == [str(tmp_path / f"img{i}.png") for i in range(3)]
    model = MultiTaskInCA.from_saved([tmp_path / "digits", tmp_path / "shapes"])
    batch = torch.stack([model.transform(Image.open(r["path"]).convert("RGB")) for r in rows])
    with torch.no_grad():
        expected = model(batch)
    for task in ("digits", "shapes"):
        probs = expected[task].softmax(-1)
        assert [r[task] for r in rows] == [model.classes(task)[i] for i in probs.argmax(-1).tolist()]
        np.testing.assert_allclose([float(r[f"{task}:probability"]) for r in rows], probs.max(-1).values, atol=1e-5)
    assert predict_main([*adapters, "--images", str(tmp_path / "img0.png"), "--format", "jsonl", "--top-k", "2"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(line["tasks"]) == {"digits", "shapes"} and len(line["tasks"]["shapes"]["labels"]) == 2
    assert predict_main([*adapters, "--images", str(tmp_path / "img0.png"), "--weights", "random",
                         "--adapter", f"x={tmp_path / 'digits'}"]) == 2
    assert "name every adapter" in capsys.readouterr().err


def test_task_adapter_from_bank_keeps_each_member_exact():
    from inca import AdapterSpec, InCABank

    specs = [AdapterSpec(layer=0, num_heads=4, lr=1e-3), AdapterSpec(layer=2, num_heads=2, num_queries=2, seed=1)]
    bank = InCABank(specs, 32, 5)
    randomise(bank)
    features = {0: torch.randn(3, 9, 32), 2: torch.randn(3, 9, 32)}
    with torch.no_grad():
        logits = bank(features)
        one = TaskAdapter.from_bank(bank, [1], list("abcde"))
        both = TaskAdapter.from_bank(bank, [0, 1], list("abcde"))
        torch.testing.assert_close(one(features), logits[1])
        torch.testing.assert_close(both(features).exp(), logits.softmax(-1).mean(0))
    assert one.layers == [2] and one.member_info == [{"lr": 1e-3, "weight_decay": 1e-4, "seed": 1}]


def upright_and_tagged(path_upright, path_tagged, seed: int = 0) -> np.ndarray:
    """A portrait image saved twice: upright, and as a camera stores it (turned a quarter to the left, with
    EXIF Orientation 6 saying "turn right to view"). Returns the upright pixels."""
    upright = np.random.default_rng(seed).integers(0, 255, (40, 24, 3), dtype=np.uint8)
    Image.fromarray(upright).save(path_upright)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(path_tagged, exif=exif)
    return upright


def test_training_stores_and_prediction_read_the_same_upright_pixels(tiny_backbone, tmp_path):
    from inca.prediction import predict_images
    from inca.tasks.folder import FileSource

    upright = upright_and_tagged(tmp_path / "upright.png", tmp_path / "tagged.png")
    with Image.open(tmp_path / "tagged.png") as raw:
        assert raw.size == (40, 24)  # stored sideways: reading the raw pixels would give a landscape image
    source = FileSource([str(tmp_path / "tagged.png"), str(tmp_path / "upright.png")])  # folder tasks and stores
    assert np.array_equal(np.asarray(source.load(0)), upright) and np.array_equal(np.asarray(source.load(1)), upright)
    model = MultiTaskInCA(tiny_backbone, {"t": adapter_for(tiny_backbone, 2, 5, 0)})
    tagged, plain = predict_images(model, [str(tmp_path / "tagged.png"), str(tmp_path / "upright.png")], top_k=5)
    assert tagged.probabilities == plain.probabilities and tagged.labels == plain.labels
    with torch.no_grad():
        expected = model(model.transform(Image.fromarray(upright))[None])["t"].softmax(-1)[0]
    np.testing.assert_allclose(sorted(tagged.probabilities["t"]), sorted(expected.tolist()), atol=1e-6)


def test_resign_accepts_a_deliberate_edit_and_old_adapters_load_with_a_warning(tiny_backbone, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from inca import resign_adapter
    from inca.adapters.common import CONFIG_FILE
    from inca.io import file_sha256

    save_adapter(adapter_for(tiny_backbone, 1, 3, 0), tmp_path / "a")
    config_file = tmp_path / "a" / CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["classes"] = ["cat", "dog", "eel"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(InCAError, match=r'was edited after it was saved .*classes\[0\]: "c0" -> "cat"'):
        load_adapter(tmp_path / "a")
    assert resign_adapter(tmp_path / "a") == ['classes[0]: "c0" -> "cat"', 'classes[1]: "c1" -> "dog"',
                                              'classes[2]: "c2" -> "eel"']
    assert load_adapter(tmp_path / "a").classes == ["cat", "dog", "eel"] and resign_adapter(tmp_path / "a") == []
    config = json.loads(config_file.read_text())
    config["members"][0]["num_heads"] = 5  # does not divide the width: not re-signed
    config_file.write_text(json.dumps(config))
    with pytest.raises(InCAError, match="num_heads=5, which does not divide its width 192"):
        resign_adapter(tmp_path / "a")

    weights = tmp_path / "a" / WEIGHTS_FILE  # an adapter saved before configs were signed (format 1)
    save_file(load_file(weights), weights)
    config["members"][0]["num_heads"] = 3
    config_file.write_text(json.dumps({**config, "format_version": 1, "weights_sha256": file_sha256(weights)}))
    with caplog.at_level("WARNING", logger="inca"):
        assert load_adapter(tmp_path / "a").classes == ["cat", "dog", "eel"]
    assert "older inca that did not sign" in caplog.text and "--resign" in caplog.text
    assert resign_adapter(tmp_path / "a") == ["first signature"]
    assert json.loads(config_file.read_text())["format_version"] == 2
    downgraded = {**json.loads(config_file.read_text()), "format_version": 1, "classes": ["dog", "cat", "eel"]}
    config_file.write_text(json.dumps(downgraded))  # claiming the old format does not skip the check
    with pytest.raises(InCAError, match=r'classes\[0\]: "cat" -> "dog"; classes\[1\]: "dog" -> "cat"\)'):
        load_adapter(tmp_path / "a")
