import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import inca.cache as cache_module
from inca.activations import open_source
from inca.backbone import create_backbone
from inca.cache import build_cache, find_cache, open_cache, read_manifest, store_path, verify_cache, write_manifest
from inca.cli import cache_main
from inca.errors import InCAError
from inca.quantize import INT8_SCHEME, QuantizedTokens
from inca.tasks import SPLITS, image_loader, load_task

from .conftest import TINY_ARGS, TINY_KWARGS


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def _files(path: Path) -> list[Path]:
    return sorted(p.relative_to(path) for p in path.rglob("layer_*.npy"))


def test_cache_equals_live_extraction(tmp_path, tiny_backbone, digits):
    cache = build_cache(tiny_backbone, digits, [0, 3], tmp_path, batch_size=50)
    assert cache.layers == [0, 3]
    for split in SPLITS:
        data = digits.splits[split]
        assert np.array_equal(cache.labels(split), data.labels)
        rows = np.arange(len(data))[::7]
        images, _ = next(iter(image_loader(data, tiny_backbone.transform, [rows])))
        live = tiny_backbone.extract(images, [0, 3])
        for layer in (0, 3):
            stored = cache.gather(split, layer, rows)
            assert stored.dtype == torch.float16
            assert torch.equal(stored, live[layer].to(torch.float16))
    manifest = cache.manifest
    assert manifest["token_layout"]["num_prefix_tokens"] == 1
    assert manifest["shapes"]["train"] == [len(digits.splits["train"]), 17, 192]
    assert verify_cache(cache.path)["files"] == 3 * 3  # labels + 2 layers per split


def test_bfloat16_store(tmp_path, tiny_backbone, digits):
    cache = build_cache(tiny_backbone, digits, [1], tmp_path, dtype="bfloat16")
    rows = np.arange(5)
    images, _ = next(iter(image_loader(digits.splits["val"], tiny_backbone.transform, [rows])))
    expected = tiny_backbone.extract(images, [1])[1].to(torch.bfloat16)
    assert torch.equal(cache.gather("val", 1, rows), expected)


def test_int8_store_half_the_bytes_close_to_float16(tmp_path, tiny_backbone, digits):
    half = build_cache(tiny_backbone, digits, [1, 3], tmp_path / "f16")
    eight = build_cache(tiny_backbone, digits, [1, 3], tmp_path / "i8", dtype="int8")
    assert eight.manifest["dtype"] == "int8" and eight.manifest["quantization"] == INT8_SCHEME
    assert "quantization" not in half.manifest
    assert eight.nbytes() <= 0.55 * half.nbytes()
    rows = np.arange(0, len(digits.splits["test"]), 5)
    for layer in (1, 3):
        packed = eight.gather("test", layer, rows)
        assert isinstance(packed, QuantizedTokens)
        cosine = torch.nn.functional.cosine_similarity(packed.dequantize(), half.gather("test", layer, rows).float(),
                                                       dim=-1)
        assert cosine.min() >= 0.999 and cosine.mean() >= 0.9999
    summary = verify_cache(eight.path)
    assert summary["dtype"] == "int8" and summary["scheme"] == INT8_SCHEME["name"]


def test_store_of_another_dtype_is_never_read_in_its_place(tmp_path, tiny_backbone, digits):
    cache = build_cache(tiny_backbone, digits, [1], tmp_path)
    assert find_cache(tmp_path, tiny_backbone, digits, [1], "float16").path == cache.path
    with pytest.raises(InCAError, match="holds float16 activations, not int8: read it with --cache-dtype float16"):
        find_cache(tmp_path, tiny_backbone, digits, [1], "int8")
    for mode in ("auto", "always", "reuse"):
        with pytest.raises(InCAError, match="not int8"):
            open_source(tiny_backbone, digits, [1], epochs=3, cache=mode, cache_dir=tmp_path, dtype="int8")
    with pytest.raises(InCAError, match="stores float16 activations, not int8"):
        build_cache(tiny_backbone, digits, [1, 2], tmp_path, dtype="int8")
    assert open_source(tiny_backbone, digits, [1], epochs=3, cache="reuse", cache_dir=tmp_path, dtype=None).cache.path \
        == cache.path  # reuse without a dtype reads whatever is there


def test_int8_store_of_another_scheme_is_refused(tmp_path, tiny_backbone, digits):
    cache = build_cache(tiny_backbone, digits, [1], tmp_path, dtype="int8")
    manifest = read_manifest(cache.path)
    manifest["quantization"] = {**INT8_SCHEME, "name": "per-token"}
    write_manifest(cache.path, manifest)  # a valid manifest, of a scheme this inca does not read
    for check in (verify_cache, open_cache):
        with pytest.raises(InCAError, match="scheme 'per-token', not 'token-groups\\+outliers'"):
            check(cache.path)


def test_reuse_and_subset(tmp_path, tiny_backbone, digits):
    first = build_cache(tiny_backbone, digits, [0, 1, 2], tmp_path)
    mtime = (first.path / "train" / "layer_0.npy").stat().st_mtime_ns
    again = build_cache(tiny_backbone, digits, [0, 1, 2], tmp_path)
    assert (again.path / "train" / "layer_0.npy").stat().st_mtime_ns == mtime
    assert find_cache(tmp_path, tiny_backbone, digits, [1]) is not None
    assert find_cache(tmp_path, tiny_backbone, digits, [3]) is None


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_interrupted_build_resumes_byte_identical(tmp_path, tiny_backbone, digits, monkeypatch, dtype):
    reference = build_cache(tiny_backbone, digits, [0, 2], tmp_path / "ref", batch_size=32, dtype=dtype)

    calls = {"n": 0}
    original = cache_module._commit

    def crash_after_some_commits(*args):
        original(*args)
        calls["n"] += 1
        if calls["n"] == 20:  # inside the train split
            raise _Interrupt

    monkeypatch.setattr(cache_module, "_commit", crash_after_some_commits)
    with pytest.raises(_Interrupt):
        build_cache(tiny_backbone, digits, [0, 2], tmp_path / "resumed", batch_size=32, commit_seconds=0,
                    dtype=dtype)
    monkeypatch.setattr(cache_module, "_commit", original)
    path = store_path(tmp_path / "resumed", tiny_backbone, digits)
    assert json.loads((path / "train" / "progress-0.json").read_text())["rows"] == 20 * 32
    with pytest.raises(InCAError, match="unfinished build"):
        open_cache(path)
    # A resumed build keeps the batch size of the interrupted one, whatever is asked now.
    resumed = build_cache(tiny_backbone, digits, [0, 2], tmp_path / "resumed", batch_size=7, dtype=dtype)
    files = _files(reference.path)
    assert files == _files(resumed.path) and len(files) == 6
    for file in files:
        assert filecmp.cmp(reference.path / file, resumed.path / file, shallow=False), file
    assert resumed.manifest["checksums"] == reference.manifest["checksums"]


@pytest.mark.slow
def test_sigkill_midway_then_rerun_is_byte_identical(tmp_path):
    """The acceptance scenario: kill -9 the CLI half way, rerun it, compare with an uninterrupted build."""
    env = {**os.environ, "INCA_CACHE": str(tmp_path / "killed")}
    command = [sys.executable, "-m", "inca", "cache", *TINY_ARGS, "--task", "synth-count",
               "--layers", "all", "--batch-size", "8", "--commit-seconds", "0"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    progress = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list((tmp_path / "killed").rglob("train/progress-0.json"))
        if found and json.loads(found[0].read_text())["rows"] >= 200:
            progress = found[0]
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert progress is not None, "the build finished or stalled before it could be killed"
    store = progress.parent.parent
    assert not json.loads((store / "manifest.json").read_text())["complete"]

    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    reference_env = {**os.environ, "INCA_CACHE": str(tmp_path / "reference")}
    assert subprocess.run(command, env=reference_env, capture_output=True).returncode == 0
    reference = next((tmp_path / "reference").glob("*/*"))
    files = _files(reference)
    assert len(files) == 12 and files == _files(store)
    for file in files:
        assert filecmp.cmp(reference / file, store / file, shallow=False), file


def test_mismatched_store_is_refused(tmp_path, tiny_backbone, digits):
    cache = build_cache(tiny_backbone, digits, [0, 1], tmp_path)
    other_weights = create_backbone("vit_tiny_patch16_224", "random", {**TINY_KWARGS, "qkv_bias": False})
    with pytest.raises(InCAError, match="another backbone"):
        open_cache(cache.path, backbone=other_weights)
    other_task = load_task("digits", seed=5)
    with pytest.raises(InCAError, match="holds task"):
        open_cache(cache.path, task=other_task)
    with pytest.raises(InCAError, match="not \\[3\\]"):
        open_cache(cache.path, layers=[1, 3])
    # Asking for more layers extends the store: the old files are untouched, the new layer equals a fresh build's.
    before = {name: (cache.path / name).read_bytes() for name in ("train/layer_0.npy", "test/layer_1.npy")}
    extended = build_cache(tiny_backbone, digits, [0, 1, 2], tmp_path)
    assert extended.path == cache.path and extended.layers == [0, 1, 2]
    assert all((cache.path / name).read_bytes() == data for name, data in before.items())
    fresh = build_cache(tiny_backbone, digits, [2], tmp_path / "fresh")
    assert (fresh.path / "val" / "layer_2.npy").read_bytes() == (cache.path / "val" / "layer_2.npy").read_bytes()
    verify_cache(cache.path)
    # A store moved to where another backbone's would be is still refused.
    other_path = store_path(tmp_path, other_weights, digits)
    other_path.parent.mkdir(parents=True)
    cache.path.rename(other_path)
    with pytest.raises(InCAError, match="another backbone"):
        build_cache(other_weights, digits, [0, 1], tmp_path)


def test_verify_detects_corruption(tmp_path, tiny_backbone, digits):
    cache = build_cache(tiny_backbone, digits, [1], tmp_path)
    verify_cache(cache.path)
    file = cache.path / "val" / "layer_1.npy"
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(InCAError, match="val/layer_1.npy does not match its checksum"):
        verify_cache(cache.path)


def test_not_a_store(tmp_path):
    with pytest.raises(InCAError, match="not an activation store"):
        verify_cache(tmp_path)


def test_unwritable_cache_dir(tmp_path, tiny_backbone, digits):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InCAError, match="cannot (write|create) the activation store.*--cache-dir"):
        build_cache(tiny_backbone, digits, [0], blocker / "sub")


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "shown"), [("float16", "float16, rows"), ("int8", "int8 (token-groups+outliers)")])
def test_cli_build_and_verify(tmp_path, capsys, dtype, shown):
    assert cache_main([*TINY_ARGS, "--task", "digits", "--layers", "last:2", "--cache-dir", str(tmp_path),
                       "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    store = out.split(": ", 1)[1].split(" (")[0]
    assert cache_main(["--verify", store]) == 0
    out = capsys.readouterr().out
    assert "files match their checksums" in out and shown in out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*TINY_ARGS, "--task", "nope"], "unknown task spec"),
        ([*TINY_ARGS, "--task", "digits", "--layers", "9"], "out of range"),
        (["--backbone", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "--task", "digits"],
         "not in the local cache"),
        (["--task", "digits"], "--backbone is required"),
        ([*TINY_ARGS, "--task", "tv:MNIST"], "needs --data-root"),
        ([*TINY_ARGS, "--task", "digits", "--batch-size", "0"], "--batch-size: expected a positive integer"),
        ([*TINY_ARGS, "--task", "digits", "--dtype", "int4"], "--dtype: invalid choice: 'int4'"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert cache_main([*args, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("inca-cache: error:")
    assert __import__("re").search(message, err), err
