"""Bad flags, recipes and specs through the real command line: one line on stderr, exit code 2, no traceback,
nothing loaded or written first."""

import os
import subprocess
import sys
import time

import pytest

from .conftest import TINY_ARGS

pytestmark = pytest.mark.slow


def inca(*args: str, tmp_path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "INCA_CACHE": str(tmp_path / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "inca", *args], capture_output=True, text=True, env=environment,
                          timeout=timeout, cwd=tmp_path)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, and the error as the one last line of stderr (log lines may precede it)."""
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "Traceback" not in result.stderr, err[-2000:]
    last = err.splitlines()[-1]
    assert last.startswith("inca-") and ": error: " in last
    assert sum(": error: " in line for line in err.splitlines()) == 1, err[-2000:]
    for needle in needles:
        assert needle in last, last
    return last


TRAIN = ["train", *TINY_ARGS, "--tasks", "digits", "--out", "out"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--heads", "0"], "--heads: expected a positive integer"),
        (["--batch-size", "0"], "--batch-size: expected a positive integer"),
        (["--num-workers", "-1"], "--num-workers: expected an integer >= 0"),
        (["--split-seed", "-1"], "--split-seed: expected an integer >= 0"),
        (["--lr", "inf"], "--lr: expected a finite number > 0"),
        (["--lr", "1e-3,nan"], "--lr: expected a finite number > 0"),
        (["--warmup-ratio", "nan"], "--warmup-ratio: expected a ratio in [0, 1)"),
        (["--warmup-ratio", "5"], "--warmup-ratio: expected a ratio in [0, 1)"),
        (["--adapter-seeds", "1.5"], "--adapter-seeds: expected an integer >= 0"),
        (["--epochs", "two"], "--epochs: expected a positive integer"),
        (["--device", "tpu"], "--device: expected auto, cpu, mps, cuda or cuda:N"),
        (["--layers", "first:3"], "--layers: expected a layer spec"),
        (["--ensemble", "0"], "--ensemble: expected a positive integer"),
        (["--cache-dtype", "int4"], "--cache-dtype: expected one of float16, bfloat16, int8"),
        (["--cache-device", "tpu"], "--cache-device: expected one of auto, disk, cpu, cuda"),
        (["--cache-memory-fraction", "1.5"], "--cache-memory-fraction: expected a fraction in (0, 1]"),
        (["--cache-memory-fraction", "0"], "--cache-memory-fraction: expected a fraction in (0, 1]"),
    ],
)
def test_bad_flags(tmp_path, flags, needle):
    assert_one_line_error(inca(*TRAIN, *flags, tmp_path=tmp_path), needle)
    assert not (tmp_path / "out").exists()


def test_cache_device_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    assert_one_line_error(inca(*TRAIN, "--cache-device", "cuda", tmp_path=tmp_path),
                          "--cache-device: cuda needs a CUDA GPU and none is available")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [("patch_size=0", "cannot be built with --model-kwargs"), ("depth=-1", "cannot be built with --model-kwargs"),
     ("no_such=1", "cannot be built with --model-kwargs"), ("img_size", "expects key=value")],
)
def test_impossible_model_kwargs(tmp_path, kwargs, needle):
    result = inca("train", "--backbone", "vit_tiny_patch16_224", "--weights", "random", "--model-kwargs", kwargs,
                  "--tasks", "digits", "--out", "out", tmp_path=tmp_path)
    assert_one_line_error(result, needle)


@pytest.mark.parametrize(
    ("line", "needle"),
    [("epochs: 1.5", "epochs: expected a positive integer, got 1.5"),
     ("lr: {a: 1}", "lr: expected a value or a list of values"),
     ("backbone: 123", "backbone: expected a string, got 123"),
     ("model_kwargs: 5", "model_kwargs: expected a string, got 5"),
     ("overwrite: sometimes", "overwrite: expected true or false"),
     ("no_such_key: 1", "unknown keys no_such_key")],
)
def test_bad_recipe_values(tmp_path, line, needle):
    (tmp_path / "r.yaml").write_text(f"tasks: digits\nweights: random\n{line}\n", encoding="utf-8")
    assert_one_line_error(inca("train", "--recipe", "r.yaml", tmp_path=tmp_path), needle)


def test_recipe_that_is_not_utf8(tmp_path):
    (tmp_path / "r.yaml").write_bytes(b"backbone: caf\xe9\n")
    assert_one_line_error(inca("train", "--recipe", "r.yaml", tmp_path=tmp_path), "not UTF-8")


def test_task_specs_are_checked_before_the_backbone_loads(tmp_path):
    start = time.monotonic()
    result = inca("train", "--backbone", "vit_huge_patch14_224", "--weights", "random", "--tasks",
                  "digits,folder:/no/such/dir", "--out", "out", tmp_path=tmp_path)
    assert_one_line_error(result, "folder:/no/such/dir", "not a directory")
    assert time.monotonic() - start < 60  # a ViT-H would take far longer to build
    assert_one_line_error(inca(*TRAIN[:-4], "--tasks", "digts", tmp_path=tmp_path), "did you mean digits")


def _multi_label_dataset(path) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    images = [Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))] * 4
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=["a", "b"]))})
    datasets.Dataset.from_dict({"image": images, "labels": [[0, 1]] * 4}, features=features).save_to_disk(path)


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["train", "--backbone", "swin_tiny_patch4_window7_224", "--weights", "random", "--tasks", "digits"],
      "is not a ViT-family transformer"),
     (["train", "--backbone", "naflexvit_base_patch16_gap", "--weights", "random", "--model-kwargs", "depth=1",
       "embed_dim=64", "num_heads=2", "--tasks", "digits"], "has no fixed input size and patch grid"),
     (["compare", *TINY_ARGS, "--tasks", "digits", "--methods", "linear", "--method-args", "linear.pool=max"],
      "linear.pool: expected one of auto, cls, mean, got 'max'"),
     (["train", *TINY_ARGS, "--tasks", "hf:multi"], "multi-label datasets are not supported")],
)
def test_unsupported_backbones_pools_and_label_columns(tmp_path, args, needle):
    _multi_label_dataset(tmp_path / "multi")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("previous")
    assert_one_line_error(inca(*args, "--out", "out", tmp_path=tmp_path), needle)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]
    assert (tmp_path / "out" / "results.json").read_text() == "previous"


def test_offline_pretrained_fails_fast_with_the_fix(tmp_path):
    start = time.monotonic()
    result = inca("cache", "--backbone", "vit_tiny_patch16_224", "--task", "digits", tmp_path=tmp_path,
                  env={"HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf")})
    err = assert_one_line_error(result, "not in the local cache", "HF_HUB_OFFLINE=1")
    assert time.monotonic() - start < 40, err
    assert result.stderr.count("Retrying") == 0


def test_help_shows_defaults_and_task_forms(tmp_path):
    result = inca("train", "--help", tmp_path=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default: 10)" in text and "(default: runs/train)" in text or "(default runs/train)" in text
    assert "folder:PATH" in text and "hf:NAME[:CONFIG]" in text and "synth-" in text


def _billion_laughs() -> str:
    """YAML's classic alias bomb: nine aliases of nine aliases of ... (10^9 values once expanded)."""
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "needle"),
    [("tasks: digits\nlr: 1e-3\nepochs: 2\nlr: 0.5\n", "key 'lr' appears twice (lines 2 and 4)"),
     ("tasks: digits\nweight-decay: 0\nweight_decay: 0.1\n", "weight_decay is given twice"),
     (_billion_laughs(), "expands to more than"),
     ("lr: " + "[" * 5000 + "]" * 5000 + "\n", "nests more than"),
     ("tasks: digits\n" + "#" * (2 << 20) + "\n", "more than a recipe's limit")],
    ids=["duplicate-key", "duplicate-spelling", "alias-bomb", "5000-deep", "huge"],
)
def test_recipes_with_repeated_keys_alias_bombs_or_deep_nesting(tmp_path, text, needle):
    (tmp_path / "r.yaml").write_text(text, encoding="utf-8")
    start = time.monotonic()
    result = inca("train", "--recipe", "r.yaml", tmp_path=tmp_path, timeout=60)
    assert_one_line_error(result, "r.yaml", needle)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


def _image_classes(root, classes=("a", "b"), count=4) -> None:
    """Class folders of 8x8 PNGs, dark for the first class and bright for the second."""
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (200 * c + i,) * 3).save(root / name / f"{i}.png")


def _truncated_jpeg(path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _hf_test_with_a_class_train_lacks(path) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    def split(names, labels):
        images = [Image.fromarray(np.full((8, 8, 3), 40 * label, dtype=np.uint8)) for label in labels]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    datasets.DatasetDict({"train": split(["cat", "dog"], [0, 1] * 4),
                          "test": split(["eel", "dog", "cat"], [0, 1, 2])}).save_to_disk(path)


@pytest.mark.parametrize(
    ("layout", "needles"),
    [("splits_beside_classes", ["split folders (", "data/test, ", "data/train) beside other folders (", "data/c, "]),
     ("no_train", ["data/test, ", "data/val without a train folder"]),
     ("val_and_validation", ["data/val, ", "data/validation are all the val split"]),
     ("unknown_test_class", ["data/test has classes ['z'] that train does not have"]),
     ("truncated", ["1 unreadable image(s): ", "data/b/cut.jpg (image file is truncated", "--skip-bad-images"]),
     ("hf_class_train_lacks", ["the 'test' split has class 'eel' that train does not have"]),
     ("tv_imagefolder", ["torchvision's ImageFolder is not a dataset", "use folder:PATH"])],
)
def test_data_that_cannot_be_trusted_is_one_line(tmp_path, layout, needles):
    """Every ambiguous folder layout, a class only val/test has, an image training could not decode, and a
    torchvision class that is not a dataset: one line naming what and where, before anything is trained."""
    data = tmp_path / "data"
    splits = {"splits_beside_classes": ["train", "test"], "no_train": ["val", "test"],
              "val_and_validation": ["train", "val", "validation"], "unknown_test_class": ["train", "test"]}
    for split in splits.get(layout, []):
        _image_classes(data / split)
    if layout == "splits_beside_classes":
        _image_classes(data, classes=("c", "d"))
    elif layout == "unknown_test_class":
        _image_classes(data / "test", classes=("z",))
    elif layout == "truncated":
        _image_classes(data)
        _truncated_jpeg(data / "b" / "cut.jpg")
    spec = {"hf_class_train_lacks": "hf:data", "tv_imagefolder": "tv:ImageFolder"}.get(layout, "folder:data")
    if layout == "hf_class_train_lacks":
        _hf_test_with_a_class_train_lacks(data)
    result = inca("train", *TINY_ARGS, "--tasks", spec, "--epochs", "1", "--out", "out", tmp_path=tmp_path)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "out" / "results.json").exists()


def test_litter_fifos_and_bad_images_do_not_stop_a_folder_task(tmp_path):
    """Notebook checkpoints, an empty cache folder, macOS litter and a FIFO named like an image are skipped
    (the FIFO would block a reader forever); a truncated JPEG is left out and counted with --skip-bad-images."""
    import json

    data = tmp_path / "data"
    _image_classes(data)
    _image_classes(data / ".ipynb_checkpoints", classes=("a-checkpoint",))
    _image_classes(data / "__MACOSX", classes=("a",))
    (data / ".cache").mkdir()
    os.mkfifo(data / "a" / "pipe.png")
    _truncated_jpeg(data / "b" / "cut.jpg")
    result = inca("train", *TINY_ARGS, "--tasks", "folder:data", "--layers", "-1", "--epochs", "1", "--out", "out",
                  "--skip-bad-images", tmp_path=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cut.jpg (image file is truncated" in result.stderr
    task = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"][f"folder:{data.resolve()}"]
    assert task["typed_spec"] == "folder:data"
    assert task["classes"] == ["a", "b"] and sum(task["sizes"].values()) == 8 and task["skipped_images"] == 1


@pytest.mark.parametrize("denied", ["image", "class folder"])
def test_permission_denied_is_one_line_naming_it(tmp_path, denied):
    """Run as a user whom permissions stop (root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH when the tests
    run as root): a denied image is named (or skipped with --skip-bad-images), a denied class folder too."""
    import shutil

    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root ignores permissions, and setpriv (to drop that) is missing")
    data = tmp_path / "data"
    _image_classes(data)
    target = data / "a" / "1.png" if denied == "image" else data / "b"
    target.chmod(0)
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    command = [*drop, sys.executable, "-m", "inca", "train", *TINY_ARGS, "--tasks", "folder:data", "--epochs", "1",
               "--out", "out"]
    environment = {**os.environ, "INCA_CACHE": str(tmp_path / "cache")}
    try:
        refused = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300, cwd=tmp_path)
        where = target.relative_to(tmp_path)  # as the spec gives the folder: relative to the working directory
        needle = f"{where} (permission denied)" if denied == "image" else f"cannot list folder {where} (permission"
        assert_one_line_error(refused, needle)
        if denied == "image":
            skipped = subprocess.run([*command, "--layers", "-1", "--skip-bad-images"], capture_output=True,
                                     text=True, env=environment, timeout=300, cwd=tmp_path)
            assert skipped.returncode == 0, skipped.stderr[-2000:]
    finally:
        target.chmod(0o755)


NO_TORCH = """import sys
from inca.cli import {main}
code = {main}({argv!r})
assert not any(name.split(".")[0] in ("torch", "timm", "torchvision") for name in sys.modules), "torch imported"
sys.exit(code)
"""


def without_torch(main: str, argv: list[str], tmp_path) -> subprocess.CompletedProcess:
    """``main(argv)`` in a fresh interpreter that fails if torch, timm or torchvision was imported."""
    environment = {**os.environ, "INCA_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", NO_TORCH.format(main=main, argv=argv)], capture_output=True,
                          text=True, env=environment, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize(("main", "args", "needle"), [
    ("train_main", ["--tasks", "digits,folder:/no/such/dir"], "folder:/no/such/dir: /no/such/dir is not a directory"),
    ("probe_main", ["--tasks", "folder:empty"], "class folders ['a'] under empty hold no valid file"),
    ("compare_main", ["--tasks", "tv:NoSuchSet", "--data-root", "."], "torchvision has no dataset 'NoSuchSet'"),
    ("cache_main", ["--tasks", "tv:MNIST", "--data-root", "missing", "--cache-dir", "out"],
     "--data-root missing is not a directory"),
    ("train_main", ["--tasks", "digits,synth-colour", "--layers", "best:1", "--probe-report", "probe.json"],
     "probe report probe.json has no task synth-colour"),
])
def test_bad_input_is_refused_before_torch_is_imported(tmp_path, main, args, needle):
    """Task specs (paths, folder layouts, torchvision names and roots) and the probe report's coverage of every
    task are checked first: the one-line error comes without importing torch, nothing is written."""
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "probe.json").write_text('{"backbone": {"num_blocks": 4}, "tasks": {"digits": {}}}')
    out = [] if main == "cache_main" else ["--out", "out"]
    result = without_torch(main, [*TINY_ARGS, *args, *out], tmp_path)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--adapter", "no/such/adapter", "--images", "a.png"], "--adapter no/such/adapter is not a directory"),
    (["--adapter", "faces=empty", "--images", "a.png"], "--adapter empty holds no saved adapter (adapter_config.json)"),
    (["--run", "adapter", "--images", "a.png"], "adapter is not an output directory of inca-train (results.json)"),
    (["--adapter", "adapter", "--images", "a.png", "b.png"], "image b.png does not exist"),
    (["--adapter", "adapter", "--images", "a.png", "--output", "a.png/rows.csv"], "a.png is a file, not a directory"),
    (["--adapter", "adapter", "--export-onnx", "empty"], "cannot write the ONNX model to empty: it is a directory"),
])
def test_inca_predict_checks_its_input_before_torch_is_imported(tmp_path, args, needle):
    """The saved models, runs, images and the file to write are checked before any model loads."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "a.png").write_bytes(b"")
    assert_one_line_error(without_torch("predict_main", args, tmp_path), needle)


def test_a_probe_report_of_another_depth_is_refused_before_any_task_loads(tmp_path):
    report = '{"backbone": {"name": "vit_base_patch16_224", "num_blocks": 12}, "tasks": {"digits": {}}}'
    (tmp_path / "probe.json").write_text(report)
    result = inca(*TRAIN, "--layers", "best:2", "--probe-report", "probe.json", tmp_path=tmp_path)
    assert_one_line_error(result, "probe report probe.json ranks the layers of vit_base_patch16_224 (12 blocks), "
                                  "but this backbone has 4 blocks")
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_probe_report_finds_each_task_under_any_spelling(tmp_path, monkeypatch):
    """A report keyed by the path as typed (as inca wrote it before canonical specs) covers the same folder given
    another way; a task it lacks is one line naming the task and the report."""
    from inca.errors import InCAError
    from inca.probe_report import check_probe_report

    (tmp_path / "data").mkdir()
    (tmp_path / "probe.json").write_text('{"tasks": {"folder:data": {}, "digits": {}}}')
    monkeypatch.chdir(tmp_path)
    check_probe_report("probe.json", [f"folder:{tmp_path / 'data'}/", "digits"])
    with pytest.raises(InCAError, match=r"^probe report probe.json has no task synth-colour; it has folder:/"):
        check_probe_report("probe.json", ["digits", "synth-colour"])
