import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import inca.tasks.folder
from inca import options as opt
from inca.config import hparam
from inca.errors import InCAError
from inca.tasks import (
    SPLITS,
    TASK_SOURCES,
    Task,
    TaskLoadConfig,
    check_task_spec,
    find_task_source,
    image_loader,
    load_task,
    parse_task_list,
    register_task_source,
    sequential_batches,
    task_settings,
    task_sources_help,
    task_spec_forms,
)
from inca.tasks.base import ArraySource, Split, make_splits
from inca.tasks.builtin import SYNTH_TASKS


def _check_task(task, num_classes):
    assert task.num_classes == num_classes == len(task.classes)
    for split in SPLITS:
        data = task.splits[split]
        assert len(data) > 0
        assert data.labels.min() >= 0 and data.labels.max() < num_classes
        assert data.image(0).mode == "RGB"
    rows = [set(task.splits[s].rows.tolist()) for s in SPLITS]
    if task.splits["train"].source is task.splits["test"].source:
        assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])


def test_digits():
    task = load_task("digits")
    _check_task(task, 10)
    assert sum(task.sizes().values()) == 1797
    assert load_task("digits").fingerprint == task.fingerprint
    assert load_task("digits", seed=1).fingerprint != task.fingerprint


@pytest.mark.parametrize("kind", sorted(SYNTH_TASKS))
def test_synth_tasks_are_deterministic_and_balanced(kind):
    task = load_task(f"synth-{kind}")
    _check_task(task, len(SYNTH_TASKS[kind][0]))
    again = load_task(f"synth-{kind}")
    assert np.array_equal(task.splits["train"].source.images, again.splits["train"].source.images)
    assert task.fingerprint == again.fingerprint
    other = load_task(f"synth-{kind}", seed=1)
    assert not np.array_equal(task.splits["test"].source.images, other.splits["test"].source.images)
    counts = np.bincount(task.splits["train"].labels)
    assert counts.max() - counts.min() <= 1


def test_synth_count_draws_that_many_dots():
    from scipy import ndimage

    task = load_task("synth-count")
    test = task.splits["test"]
    for index in range(40):
        image = np.asarray(test.image(index)).astype(float)
        foreground = image.min(axis=2) >= 140  # dots are bright in every channel, background is dark
        _, found = ndimage.label(foreground)
        assert found == test.labels[index] + 1


def _write_image(path, mode="RGB", size=(12, 10), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = {"L": value, "RGB": (value, 255 - value, 7), "RGBA": (value, 255 - value, 7, 128)}[mode]
    Image.new(mode, size, color=colour).save(path)


def test_folder_class_layout(tmp_path):
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(15):
            _write_image(tmp_path / cls / f"{i}.png", mode=["RGB", "L", "RGBA"][i % 3], value=10 * c + i)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    task = load_task(f"folder:{tmp_path}")
    _check_task(task, 2)
    assert task.classes == ["cat", "dog"]
    assert sum(task.sizes().values()) == 30


def test_folder_split_layout(tmp_path, monkeypatch):
    for split, count in [("train", 6), ("val", 2), ("test", 3)]:
        for cls in ["a", "b", "c"]:
            for i in range(count):
                _write_image(tmp_path / split / cls / f"{i}.jpg")
    task = load_task(f"folder:{tmp_path}")
    _check_task(task, 3)
    assert task.sizes() == {"train": 18, "val": 6, "test": 9}
    listed, visible = [], inca.tasks.folder._visible_entries  # a load lists every folder once
    monkeypatch.setattr(inca.tasks.folder, "_visible_entries", lambda s, d: listed.append(str(d)) or visible(s, d))
    assert load_task(f"folder:{tmp_path}").sizes() == task.sizes()
    assert len(listed) == len(set(listed)) == 1 + 3 + 3 * 3  # the root, its split folders and their class folders
    assert "/val/" in task.splits["val"].source.describe(int(task.splits["val"].rows[0]))


def test_folder_without_val_carves_it(tmp_path):
    for split, count in [("train", 10), ("test", 2)]:
        for cls in ["a", "b"]:
            for i in range(count):
                _write_image(tmp_path / split / cls / f"{i}.png")
    task = load_task(f"folder:{tmp_path}")
    assert task.sizes() == {"train": 18, "val": 2, "test": 4}


def test_folder_identity_follows_image_content(tmp_path):
    root = tmp_path / "data"
    for cls in ["a", "b"]:
        for i in range(5):
            _write_image(root / cls / f"{i}.png")
    before = load_task(f"folder:{root}").fingerprint
    assert load_task(f"folder:{root}").fingerprint == before  # hashes remembered, same identity
    _write_image(root / "a" / "0.png", size=(20, 20))
    changed = load_task(f"folder:{root}").fingerprint
    assert changed != before
    image = root / "a" / "1.bmp"  # uncompressed: a flipped byte keeps the file valid and the same size
    _write_image(image)
    changed = load_task(f"folder:{root}").fingerprint
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # same size, same path, other content
    stat = image.stat()
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert load_task(f"folder:{root}").fingerprint != changed


def test_corrupt_image_names_the_file(tmp_path, tiny_backbone):
    for cls in ["a", "b"]:
        for i in range(5):
            _write_image(tmp_path / cls / f"{i}.png")
    bad = tmp_path / "b" / "3.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(InCAError, match="1 unreadable image.*3.png.*--skip-bad-images") as info:
        load_task(f"folder:{tmp_path}")
    task = load_task(f"folder:{tmp_path}", skip_bad_images=True)
    assert sum(task.sizes().values()) == 9 and task.identity["skipped_images"] == 1
    for split in SPLITS:
        data = task.splits[split]
        for _ in image_loader(data, tiny_backbone.transform, sequential_batches(0, len(data), 4), num_workers=2):
            pass
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("layout", "message"),
    [("missing", "not a directory"), ("empty", "no class folders"), ("empty_class", "no valid file"),
     ("unknown_val_class", "classes \\['z'\\] that train does not have")],
)
def test_bad_folders(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "empty":
        root.mkdir()
    elif layout == "empty_class":
        _write_image(root / "a" / "0.png")
        (root / "b").mkdir()
    elif layout == "unknown_val_class":
        for cls in ["a", "b"]:
            _write_image(root / "train" / cls / "0.png")
        _write_image(root / "val" / "z" / "0.png")
    with pytest.raises(InCAError, match=message):
        load_task(f"folder:{root}")


def _hf_dataset(n, labels=None):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"img": images, "label": labels or [i % 3 for i in range(n)]}, features=features)


def test_hf_from_disk_dataset_dict(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"train": _hf_dataset(30), "test": _hf_dataset(9)})
    ds.save_to_disk(tmp_path / "ds")
    task = load_task(f"hf:{tmp_path / 'ds'}")
    _check_task(task, 3)
    assert task.classes == ["x", "y", "z"]
    assert task.sizes() == {"train": 27, "val": 3, "test": 9}
    expected = np.asarray(ds["test"][2]["img"].convert("RGB"))
    assert np.array_equal(np.asarray(task.splits["test"].image(2)), expected)


def test_hf_saved_dataset_changed_on_disk_changes_the_fingerprint(tmp_path):
    import shutil

    import datasets

    datasets.DatasetDict({"train": _hf_dataset(30), "test": _hf_dataset(9)}).save_to_disk(tmp_path / "ds")
    before = load_task(f"hf:{tmp_path / 'ds'}").fingerprint
    assert load_task(f"hf:{tmp_path / 'ds'}").fingerprint == before  # stable while the data is
    changed = datasets.DatasetDict({"train": _hf_dataset(30, labels=[(i + 1) % 3 for i in range(30)]),
                                    "test": _hf_dataset(9)})
    changed.save_to_disk(tmp_path / "new")
    shutil.rmtree(tmp_path / "ds")
    (tmp_path / "new").rename(tmp_path / "ds")  # same path, same sizes, other labels
    assert load_task(f"hf:{tmp_path / 'ds'}").fingerprint != before


def test_hf_single_dataset_and_string_labels(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(40)],
         "label": ["dog" if i % 2 else "cat" for i in range(40)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    ds.save_to_disk(tmp_path / "single")
    task = load_task(f"hf:{tmp_path / 'single'}")
    _check_task(task, 2)
    assert task.classes == ["cat", "dog"]
    assert sum(task.sizes().values()) == 40


def test_hf_unlabelled_rows_are_left_out_and_an_unlabelled_split_is_carved(tmp_path, caplog):
    """-1 is how ``datasets`` marks a row without a label (ImageNet-1k's test split): such rows never count as
    class -1, a split without any label is carved from train like a missing one, and both are logged."""
    import datasets

    ds = datasets.DatasetDict({"train": _hf_dataset(30, labels=[-1, -1] + [i % 3 for i in range(28)]),
                               "test": _hf_dataset(3, labels=[-1, -1, -1])})
    ds.save_to_disk(tmp_path / "unlabelled")
    with caplog.at_level("WARNING"):
        task = load_task(f"hf:{tmp_path / 'unlabelled'}")
    _check_task(task, 3)
    assert sum(task.sizes().values()) == 28 and task.sizes()["test"] > 0
    assert all((split.labels >= 0).all() for split in task.splits.values())
    assert not set(task.splits["test"].rows) & set(task.splits["train"].rows)  # carved from train, disjoint
    assert "'test' split has no labels" in caplog.text and "2 of 30 rows of the 'train' split" in caplog.text


def test_hf_labels_beyond_the_named_classes(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"train": _hf_dataset(6), "test": _hf_dataset(3)})
    ds["test"] = ds["test"].cast_column("label", datasets.Value("int64")).map(lambda row: {"label": 7})
    ds["test"] = ds["test"].cast_column("label", datasets.ClassLabel(num_classes=8))
    ds.save_to_disk(tmp_path / "wide")
    with pytest.raises(InCAError, match="'test' split has class '7' that train does not have") as info:
        load_task(f"hf:{tmp_path / 'wide'}")
    assert "\n" not in str(info.value)


def _hf_split(labels, feature, image_column="img"):
    """A split whose image at row i is a flat grey of value 10 * (its class's position in ``CLASS_ORDER``)."""
    import datasets

    images = [Image.new("RGB", (8, 8), (_grey(feature, label),) * 3) for label in labels]
    features = datasets.Features({image_column: datasets.Image(), "label": feature})
    return datasets.Dataset.from_dict({image_column: images, "label": labels}, features=features)


CLASS_ORDER = ["cat", "dog", "eel"]


def _grey(feature, label):
    import datasets

    name = feature.names[label] if isinstance(feature, datasets.ClassLabel) else str(label)
    return 10 * (CLASS_ORDER.index(name) if name in CLASS_ORDER else 20)


def _check_names_follow_images(task):
    """Every row's class name is the one its image was drawn for: labels were mapped by name."""
    for split in SPLITS:
        data = task.splits[split]
        for index in range(len(data)):
            grey = np.asarray(data.image(index))[0, 0, 0]
            assert task.classes[data.labels[index]] == CLASS_ORDER[grey // 10], (split, index)


def test_hf_splits_are_mapped_by_class_name(tmp_path):
    """Train names [cat, dog, eel]; test lists them in another order under another image column; validation
    holds strings. Each split's labels are read by name, into train's class list."""
    import datasets

    train = _hf_split([0, 1, 2] * 6, datasets.ClassLabel(names=["cat", "dog", "eel"]))
    test = _hf_split([0, 1, 2, 2], datasets.ClassLabel(names=["eel", "cat", "dog"]), image_column="image")
    val = _hf_split(["dog", "cat", None], datasets.Value("string"))
    datasets.DatasetDict({"train": train, "validation": val, "test": test}).save_to_disk(tmp_path / "ds")
    task = load_task(f"hf:{tmp_path / 'ds'}")
    assert task.classes == ["cat", "dog", "eel"]
    assert task.sizes() == {"train": 18, "val": 2, "test": 4}
    assert [task.classes[i] for i in task.splits["test"].labels] == ["eel", "cat", "dog", "dog"]
    _check_names_follow_images(task)


def test_hf_float_labels_drop_nan_rows(tmp_path, caplog):
    import datasets

    labels = [0.0, 1.0, float("nan"), 2.0] * 5
    _hf_split(labels, datasets.Value("float32")).save_to_disk(tmp_path / "floats")
    with caplog.at_level("WARNING"):
        task = load_task(f"hf:{tmp_path / 'floats'}")
    assert task.classes == ["0", "1", "2"] and sum(task.sizes().values()) == 15
    assert "5 of 20 rows of the 'train' split have no label" in caplog.text


@pytest.mark.parametrize(
    ("train", "test", "message"),
    [(("cat,dog", [0, 1] * 5), ("cat,dog,eel", [2, 0, 1]),
      "the 'test' split has class 'eel' that train does not have \\(train's classes: cat, dog\\)"),
     (("int64", [0, 1] * 5), ("string", ["cat", "dog"]), "'test' split is labelled with class names but train"),
     (("cat,dog", [0, 1] * 5), ("int64", [0, 1]), "labelled with plain integers but train with class names"),
     (("float32", [0.5, 1.0] * 5), ("float32", [0.0, 1.0]), "holds 0.5, not a class id")],
)
def test_hf_splits_that_cannot_be_matched_are_one_line(tmp_path, train, test, message):
    import datasets

    def split(feature, labels):
        kind = datasets.ClassLabel(names=feature.split(",")) if "," in feature else datasets.Value(feature)
        return _hf_split(labels, kind)

    datasets.DatasetDict({"train": split(*train), "test": split(*test)}).save_to_disk(tmp_path / "ds")
    with pytest.raises(InCAError, match=message) as info:
        load_task(f"hf:{tmp_path / 'ds'}")
    assert "\n" not in str(info.value)


def test_hf_multi_label_column_is_one_line(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(6)],
         "labels": [[i % 3, (i + 1) % 3] for i in range(6)]},
        features=datasets.Features({"image": datasets.Image(),
                                    "labels": datasets.Sequence(datasets.ClassLabel(names=["a", "b", "c"]))}),
    )
    ds.save_to_disk(tmp_path / "multi")
    with pytest.raises(InCAError, match="multi-label datasets are not supported") as info:
        load_task(f"hf:{tmp_path / 'multi'}")
    assert "\n" not in str(info.value)


def test_hf_offline_unknown_dataset():
    with pytest.raises(InCAError, match="local HF cache") as info:
        load_task("hf:nobody/no-such-dataset-xyz")
    assert "\n" not in str(info.value)


def _write_mnist(root, split_prefix, n, seed):
    import struct

    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    (raw / f"{split_prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    (raw / f"{split_prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return images, labels


def test_torchvision_mnist_fixture(tmp_path):
    train_images, _ = _write_mnist(tmp_path, "train", 50, 0)
    _, test_labels = _write_mnist(tmp_path, "t10k", 20, 1)
    task = load_task("tv:MNIST", data_root=str(tmp_path))
    _check_task(task, 10)
    assert task.sizes() == {"train": 45, "val": 5, "test": 20}
    assert np.array_equal(task.splits["test"].labels, test_labels)
    row = int(task.splits["train"].rows[0])
    assert np.array_equal(np.asarray(task.splits["train"].image(0))[..., 0], train_images[row])


def test_torchvision_root_rewritten_in_place_changes_the_fingerprint(tmp_path):
    _write_mnist(tmp_path, "train", 50, 0)
    _write_mnist(tmp_path, "t10k", 20, 1)
    before = load_task("tv:MNIST", data_root=str(tmp_path)).fingerprint
    assert load_task("tv:MNIST", data_root=str(tmp_path)).fingerprint == before
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    stat = images.stat()
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF
    images.write_bytes(bytes(data))  # same size, and the old mtime put back
    os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_task("tv:MNIST", data_root=str(tmp_path)).fingerprint != before


@pytest.mark.parametrize(
    ("spec", "root", "message"),
    [("tv:MNIST", None, "needs --data-root"), ("tv:MNIST", "EMPTY", "not found under.*--download"),
     ("tv:NoSuchSet", "EMPTY", "torchvision has no dataset"),
     ("tv:imagefolder", None, "torchvision's ImageFolder is not a dataset \\(.*use folder:PATH\\)"),
     ("tv:FakeData", "EMPTY", "FakeData is not a dataset \\(random images"),
     ("tv:VisionDataset", "EMPTY", "VisionDataset is not a dataset"),
     ("tv:DatasetFolder", "EMPTY", "DatasetFolder is not a dataset")],
)
def test_torchvision_errors(tmp_path, spec, root, message):
    with pytest.raises(InCAError, match=message):
        load_task(spec, data_root=str(tmp_path) if root else None)


@pytest.mark.parametrize("spec", ["digitz", "synth-nothing", "hf:", "imagenet"])
def test_unknown_specs(spec):
    with pytest.raises(InCAError, match="unknown task spec"):
        load_task(spec)


def test_task_lists():
    assert parse_task_list("digits, synth-count") == ["digits", "synth-count"]
    assert parse_task_list(["a,b", "c"]) == ["a", "b", "c"]
    with pytest.raises(InCAError, match="no tasks"):
        parse_task_list("")


def test_image_loader_batches(tiny_backbone):
    task = load_task("digits")
    data = task.splits["val"]
    batches = [np.array([0, 3, 5]), np.array([7])]
    loaded = list(image_loader(data, tiny_backbone.transform, batches))
    assert [b[0].shape for b in loaded] == [torch.Size([3, 3, 32, 32]), torch.Size([1, 3, 32, 32])]
    assert loaded[0][1].tolist() == data.labels[[0, 3, 5]].tolist()


def test_help_lists_every_synthetic_task():
    forms = task_spec_forms()
    for kind in SYNTH_TASKS:
        assert kind in forms
        check_task_spec(f"synth-{kind}")


@dataclass(frozen=True, kw_only=True)
class NoiseConfig(TaskLoadConfig):
    level: float = hparam(30.0, help="noise standard deviation", source="a test's own", check=opt.non_negative_float)


def _check_noise(spec: str, argument: str, settings: TaskLoadConfig) -> None:
    if not argument.isdigit() or int(argument) < 2:
        raise InCAError(f"task {spec}: give noise:K with K >= 2 classes")


def _load_noise(spec: str, argument: str, settings: NoiseConfig) -> Task:
    """K classes of 8x8 images, class k a grey level of 60 + 40k under Gaussian noise of the level asked."""
    classes = int(argument)
    labels = np.arange(30 * classes) % classes
    rng = np.random.default_rng(settings.split_seed)
    images = np.clip(60 + 40 * labels[:, None, None] + rng.normal(0, settings.level, (len(labels), 8, 8)), 0, 255)
    split = Split(ArraySource(images.astype(np.uint8), spec), np.arange(len(labels)), labels)
    return Task(spec, [str(k) for k in range(classes)], make_splits({"train": split}, seed=settings.split_seed),
                {"level": settings.level, "seed": settings.split_seed})


@pytest.fixture
def noise_source():
    """A task source added by one registration, as another package's module would through its entry point."""
    source = register_task_source("noise:", load=_load_noise, check=_check_noise, spec_form="noise:K",
                                  summary="K grey levels under Gaussian noise", config=NoiseConfig)
    yield source
    TASK_SOURCES.pop("noise")


def test_a_new_task_source_is_one_registration(noise_source):
    from inca.cli import cache_parser

    task = load_task("noise:3")
    _check_task(task, 3)
    assert task.identity == {"level": 30.0, "seed": 0}
    assert load_task("noise:3", settings=NoiseConfig(level=5.0)).fingerprint != task.fingerprint
    assert load_task("noise:3", seed=1).fingerprint != task.fingerprint
    with pytest.raises(InCAError, match=r"unknown task spec 'nose:3' \(did you mean noise:3\?\).*noise:K") as typo:
        load_task("nose:3")
    with pytest.raises(InCAError, match="give noise:K") as bad:
        check_task_spec("noise:one")
    assert "\n" not in str(typo.value) + str(bad.value)
    assert "noise:K" in task_spec_forms() and "noise:K (K grey levels under Gaussian noise)" in task_sources_help()

    parser = cache_parser()
    assert "noise:K" in parser.format_help() and "--noise-level" in parser.format_help()
    args = parser.parse_args(["--task", "noise:3,digits", "--noise-level", "5", "--split-seed", "2"])
    assert task_settings(args, "noise:3") == NoiseConfig(level=5.0, split_seed=2)
    assert task_settings(args, "digits") == TaskLoadConfig(split_seed=2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--noise-level", "-1"])


def test_a_source_is_refused_without_its_form_or_settings_metadata():
    @dataclass(frozen=True, kw_only=True)
    class Undocumented(TaskLoadConfig):
        level: float = 1.0

    with pytest.raises(ValueError, match="needs help and source"):
        register_task_source("quiet:", load=_load_noise, spec_form="quiet:K", summary="s", config=Undocumented)
    with pytest.raises(ValueError, match="spec_form and a summary"):
        register_task_source("quiet:", load=_load_noise, spec_form="", summary="s")
    with pytest.raises(ValueError, match="registered twice"):
        register_task_source("hf:", load=_load_noise, spec_form="hf:X", summary="s")
    assert "quiet" not in TASK_SOURCES


@pytest.mark.parametrize("name", list(TASK_SOURCES))
def test_task_source_contract(name):
    """Every registered source shows a form and a summary, claims its own specs only, takes settings that
    extend the shared ones, and a spec of its form with nothing valid after it is refused in one line."""
    source = TASK_SOURCES[name]
    assert source.spec_form and source.summary and source.spec_form in task_spec_forms()
    assert issubclass(source.config, TaskLoadConfig)
    source.config.check_definition(f"task source {name!r}")
    for spec in [*source.names, *([f"{source.prefix}x"] if source.prefix else [])]:
        assert find_task_source(spec)[0] is source
    garbage = source.prefix or f"{source.names[0]}-garbage"
    with pytest.raises(InCAError, match="unknown task spec") as info:
        check_task_spec(garbage)
    assert "\n" not in str(info.value) and source.spec_form in str(info.value)


def _class_tree(root, classes=("a", "b"), count=3):
    for cls in classes:
        for i in range(count):
            _write_image(root / cls / f"{i}.png", value=10 * i + 100 * classes.index(cls))


@pytest.mark.parametrize(
    ("layout", "message"),
    [("splits_beside_classes", "split folders \\(.*/test, .*/train\\) beside other folders \\(.*/c, .*/d\\)"),
     ("no_train", "/test, .*/val without a train folder"),
     ("val_twice", "/val, .*/validation are all the val split"),
     ("train_twice", "/TRAIN, .*/train are all the train split")],
)
def test_ambiguous_folder_layouts_are_refused(tmp_path, layout, message):
    root = tmp_path / "data"
    splits = {"splits_beside_classes": ["train", "test"], "no_train": ["val", "test"],
              "val_twice": ["train", "val", "validation"], "train_twice": ["train", "TRAIN"]}[layout]
    for split in splits:
        _class_tree(root / split)
    if layout == "splits_beside_classes":
        _class_tree(root, classes=("c", "d"))
    with pytest.raises(InCAError, match=message) as info:
        load_task(f"folder:{root}")
    assert "\n" not in str(info.value)


def test_hidden_and_system_folders_are_skipped(tmp_path, caplog):
    """Notebook checkpoints, caches, macOS and NAS litter are never classes or images, at any level."""
    root = tmp_path / "data"
    _class_tree(root / "Train")  # split folder names in any letter case
    _class_tree(root / "test")
    for litter in [root / ".ipynb_checkpoints", root / "Train" / ".ipynb_checkpoints", root / "__MACOSX" / "a",
                   root / "Train" / "a" / ".ipynb_checkpoints", root / "test" / "@eaDir"]:
        _write_image(litter / "0-checkpoint.png")
    (root / ".cache").mkdir()
    (root / "Train" / ".cache").mkdir()
    (root / "Train" / "b" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    _write_image(root / "Train" / "stray.png")
    with caplog.at_level("WARNING"):
        task = load_task(f"folder:{root}")
    assert task.classes == ["a", "b"]
    assert sum(task.sizes().values()) == 12 and task.sizes()["test"] == 6
    assert "1 image file(s) directly in" in caplog.text and "stray.png" in caplog.text


def test_only_regular_files_are_images(tmp_path):
    """A FIFO named like an image would block a reader; sockets are no images; a link to an image is one."""
    import socket

    root = tmp_path / "data"
    _class_tree(root, count=4)
    os.mkfifo(root / "a" / "fifo.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "b" / "socket.png"))
    (root / "b" / "link.png").symlink_to(root / "a" / "0.png")
    (root / "b" / "dangling.png").symlink_to(root / "nowhere.png")
    try:
        task = load_task(f"folder:{root}")
    finally:
        server.close()
    files = {os.path.basename(task.splits[s].source.describe(int(r))) for s in SPLITS for r in task.splits[s].rows}
    assert sum(task.sizes().values()) == 9 and "link.png" in files
    from inca.tasks.folder import decode_problem, unreadable_images

    assert decode_problem(str(root / "a" / "fifo.png")) == "not a regular file"
    fifo = str(root / "a" / "fifo.png")
    assert unreadable_images([fifo, str(root / "a" / "0.png")]) == [fifo]


def test_truncated_jpeg_is_found_before_training(tmp_path):
    """PIL's verify() reads only the header: the scan decodes in full, as training does."""
    root = tmp_path / "data"
    _class_tree(root, count=4)
    bad = root / "b" / "cut.jpg"
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    with Image.open(bad) as image:
        image.verify()  # the header check alone passes
    with pytest.raises(InCAError, match=r"1 unreadable image\(s\): .*cut.jpg \(image file is truncated") as info:
        load_task(f"folder:{root}")
    assert "\n" not in str(info.value)
    task = load_task(f"folder:{root}", skip_bad_images=True)
    assert sum(task.sizes().values()) == 8 and task.identity["skipped_images"] == 1


def test_permission_denied_images_and_folders(tmp_path, monkeypatch):
    """What the system refuses to read: an image is a bad image (named with why; skipped and counted on
    request, and checked again next time); a class folder is one line naming it. Injected, since tests may
    run as root, whom permissions do not stop (the real command is tested in test_bad_input)."""
    import inca.tasks.folder as folder

    root = tmp_path / "data"
    _class_tree(root, count=4)
    denied = str(root / "a" / "1.png")
    real_sha256 = folder.file_sha256

    def refusing(path):
        if str(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_sha256(path)

    monkeypatch.setattr(folder, "file_sha256", refusing)
    with pytest.raises(InCAError, match=f"1 unreadable image\\(s\\): {denied} \\(permission denied\\)"):
        load_task(f"folder:{root}")
    task = load_task(f"folder:{root}", skip_bad_images=True)
    assert sum(task.sizes().values()) == 7 and task.identity["skipped_images"] == 1
    monkeypatch.setattr(folder, "file_sha256", real_sha256)  # permission fixed: read again, not remembered
    assert load_task(f"folder:{root}").identity["skipped_images"] == 0

    real_scandir = os.scandir

    def refusing_listing(path):
        if str(path) == str(root / "b"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(folder.os, "scandir", refusing_listing)
    with pytest.raises(InCAError, match=f"cannot list folder {root / 'b'} \\(permission denied\\)"):
        load_task(f"folder:{root}", skip_bad_images=True)


class _ToyDataset:
    """A torchvision-style dataset whose test split lists its classes in another order (and, under a root
    named ``eel``, has a class train lacks); each image's grey level says its class."""

    def __init__(self, root, train=True, download=False):
        extra = ["eel"] if os.path.basename(root) == "eel" else []
        self.classes = ["cat", "dog"] if train else ["dog", "cat", *extra]
        self.names = ["cat", "dog"] * 4 + ["cat"] if train else ["dog", "cat", "cat", "dog", *extra]
        self.targets = [self.classes.index(name) for name in self.names]
        if train:
            self.names.append("cat")
            self.targets.append(-1)  # a row without a label

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, row):
        return Image.new("RGB", (8, 8), (10 * CLASS_ORDER.index(self.names[row]),) * 3), self.targets[row]


def test_torchvision_splits_are_mapped_by_class_name(tmp_path, monkeypatch, caplog):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "ToyPets", _ToyDataset, raising=False)
    with caplog.at_level("WARNING"):
        task = load_task("tv:ToyPets", data_root=str(tmp_path))
    assert task.classes == ["cat", "dog"] and task.sizes()["test"] == 4
    assert [task.classes[i] for i in task.splits["test"].labels] == ["dog", "cat", "cat", "dog"]
    _check_names_follow_images(task)
    assert "1 of 10 rows of the train split have no label (-1)" in caplog.text
    (tmp_path / "eel").mkdir()
    with pytest.raises(InCAError, match="the 'test' split has class 'eel' that train does not have") as info:
        load_task("tv:ToyPets", data_root=str(tmp_path / "eel"))
    assert "\n" not in str(info.value)


def test_images_turned_by_exif_are_part_of_a_folder_task_identity(tmp_path):
    """A photo read upright by its EXIF orientation yields other activations than its stored pixels: a store
    built by a reader that ignored the tag must not be reused, so the task records how many images turn."""
    _class_tree(tmp_path / "plain")
    assert "turned_by_exif" not in load_task(f"folder:{tmp_path / 'plain'}").identity
    _class_tree(tmp_path / "photos")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    Image.open(tmp_path / "photos" / "a" / "1.png").save(tmp_path / "photos" / "a" / "1.png", exif=exif)
    assert load_task(f"folder:{tmp_path / 'photos'}").identity["turned_by_exif"] == 1


class _PhotoDataset(_ToyDataset):
    """Its images read from files, as torchvision's Flowers102 or DTD do (``Image.open(f).convert("RGB")``), the
    first one a photo stored on its side whose EXIF says to turn it."""

    def __init__(self, root, train=True, download=False):
        super().__init__(root, train, download)
        self.root = root

    def __getitem__(self, row):
        if row > 0:
            return super().__getitem__(row)
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
        path = os.path.join(self.root, "photo.jpg")
        Image.new("RGB", (12, 8)).save(path, exif=exif)
        with Image.open(path) as image:
            return image.convert("RGB"), self.targets[row]


def test_torchvision_images_from_files_are_read_upright_by_their_exif(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "ToyPhotos", _PhotoDataset, raising=False)
    task = load_task("tv:ToyPhotos", data_root=str(tmp_path))
    source = task.splits["train"].source
    assert source.load(0).size == (8, 12)  # upright, as a folder task and inca-predict read the same file
    assert source.load(1).size == (8, 8)
    assert task.identity["upright"]


def test_a_torchvision_dataset_held_as_arrays_keeps_its_identity(tmp_path, monkeypatch):
    """CIFAR-style datasets keep their images in one array (``data``), which no EXIF reaches: reading files upright
    does not change their identity, so their stores stay valid."""
    import torchvision.datasets

    class Arrays(_ToyDataset):
        def __init__(self, root, train=True, download=False):
            super().__init__(root, train, download)
            self.data = np.zeros((len(self.targets), 8, 8, 3), np.uint8)

    monkeypatch.setattr(torchvision.datasets, "ToyArrays", Arrays, raising=False)
    assert "upright" not in load_task("tv:ToyArrays", data_root=str(tmp_path)).identity


def _small_folder(root, shade: int = 0) -> None:
    for c, name in enumerate(["dark", "bright"]):
        for i in range(6):
            _write_image(root / name / f"{i}.png", value=shade + 100 * c + i)


def test_every_spelling_of_a_folder_is_one_task_with_one_short_name(tmp_path, monkeypatch, caplog):
    """Relative, absolute, with ``..``, with a trailing slash, through a symlink: one spec, fingerprint and output
    name (the folder's own name and the fingerprint); the spelling as typed is kept."""
    from inca.suite import task_directory
    from inca.tasks import canonical_task_spec, check_task_specs

    faces = tmp_path / "data" / "faces"
    _small_folder(faces)
    (tmp_path / "link").symlink_to(faces, target_is_directory=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    spellings = ["folder:../data/faces", f"folder:{faces}", f"folder:{faces}/", "folder:../work/../data/faces",
                 f"folder:{tmp_path}/link", "folder:../link/"]
    canonical = f"folder:{faces.resolve()}"
    assert {canonical_task_spec(spec) for spec in spellings} == {canonical}
    tasks = [load_task(spec) for spec in spellings]
    assert {task.spec for task in tasks} == {canonical}
    assert [task.typed_spec for task in tasks] == spellings
    assert len({task.fingerprint for task in tasks}) == 1
    assert {task_directory(task) for task in tasks} == {f"faces-{tasks[0].fingerprint[:8]}"}
    with caplog.at_level("WARNING"):
        assert check_task_specs(spellings, lambda spec: TaskLoadConfig()) == spellings[:1]
    assert "is the same task as folder:../data/faces" in caplog.text

    other = tmp_path / "elsewhere" / "faces"  # the same name (and images), another folder: another task
    _small_folder(other)
    again = load_task(f"folder:{other}")
    assert again.name == "faces" and task_directory(again) != task_directory(tasks[0])


def test_other_specs_keep_their_names_and_torchvision_names_their_case():
    from inca.tasks import canonical_task_spec

    assert canonical_task_spec(" digits ") == "digits"
    assert canonical_task_spec("hf:org/name:config") == "hf:org/name:config"  # a hub name, not a path
    assert canonical_task_spec("tv:cifar10") == "tv:CIFAR10"
    assert load_task("synth-colour").name == "synth-colour"


def test_torchvision_names_are_read_without_torch_and_match_its_classes():
    """The names the up-front check reads from torchvision's source are the dataset classes it exports."""
    import torchvision.datasets

    from inca.images import IMAGE_EXTENSIONS
    from inca.tasks.tv import _declared_dataset_names

    exported = {name for name in dir(torchvision.datasets) if isinstance(getattr(torchvision.datasets, name), type)}
    declared = set(_declared_dataset_names().values())
    assert {"CIFAR10", "DTD", "Flowers102", "ImageFolder"} <= declared and declared - exported <= {
        "wrap_dataset_for_transforms_v2"}  # a function torchvision also exports
    assert IMAGE_EXTENSIONS == torchvision.datasets.folder.IMG_EXTENSIONS


@pytest.mark.parametrize(("spec", "make", "needle"), [
    ("folder:data", lambda root: (root / "data" / "a").mkdir(parents=True), "hold no valid file"),
    ("folder:data", lambda root: _write_image(root / "data" / "train" / "a" / "0.png") or (
        root / "data" / "extra").mkdir(), "split folders (data/train) beside other folders"),
    ("hf:./nodata", lambda root: None, "./nodata is not a directory"),
    ("hf:data", lambda root: (root / "data").mkdir(), "holds no dataset written by datasets' save_to_disk"),
    ("tv:MNIST", lambda root: None, "--data-root missing is not a directory"),
])
def test_specs_are_checked_without_reading_images(tmp_path, monkeypatch, spec, make, needle):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    with pytest.raises(InCAError, match=re.escape(needle)):
        check_task_spec(spec, TaskLoadConfig(data_root="missing"))
