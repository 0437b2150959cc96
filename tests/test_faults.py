"""Faults, stale or corrupt data and hostile file systems, through the real command line: nothing silently wrong,
nothing previously written lost, every failure one line with exit code 2."""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inca.errors import InCAError
from inca.io import atomic_write, atomic_write_text, directory_lock, require_free_space

from .conftest import TINY_ARGS
from .test_bad_input import assert_one_line_error

pytestmark = pytest.mark.slow


def run(*args: str, cwd, env: dict | None = None, environment_patch: str | None = None) -> subprocess.CompletedProcess:
    """``python -m inca ARGS`` in a subprocess; with ``environment_patch``, code that first replaces part of the
    process's environment (the disk, the memory): faults no test machine can be made to have on demand."""
    environment = {**os.environ, "INCA_CACHE": str(cwd / "cache"), **(env or {})}
    command = [sys.executable, "-m", "inca", *args]
    if environment_patch is not None:
        command = [sys.executable, "-c", f"import sys\n{environment_patch}\nfrom inca.__main__ import main\n"
                   f"sys.argv = ['inca', *{list(args)!r}]\nsys.exit(main())"]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, cwd=cwd)


def image_folder(root, per_class: int = 12, seed: int = 0) -> None:
    """Two classes of small PNGs that a tiny ViT can tell apart (dark vs bright)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["dark", "bright"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (16, 16, 3)) + 150 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:02d}.png")


def train(cwd, task: str, *extra: str) -> subprocess.CompletedProcess:
    return run("train", *TINY_ARGS, "--tasks", task, "--layers", "-1", "--epochs", "2", "--out", "out", *extra,
               cwd=cwd)


def results(cwd) -> dict:
    return json.loads((cwd / "out" / "results.json").read_text())


def test_changed_images_are_never_served_from_a_stale_store_or_result(tmp_path):
    image_folder(tmp_path / "data")
    task = f"folder:{tmp_path / 'data'}"
    assert train(tmp_path, task, "--cache", "always").returncode == 0
    first = results(tmp_path)["tasks"][task]
    image = tmp_path / "data" / "dark" / "00.png"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(image)  # same path, same format and size class, new content
    rerun = train(tmp_path, task, "--cache", "always")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    second = results(tmp_path)["tasks"][task]
    assert "data changed since it was trained" in rerun.stderr
    assert second["fingerprint"] != first["fingerprint"] and second["cache_path"] != first["cache_path"]
    assert second["best"]["adapter_dir"] != first["best"]["adapter_dir"]


def test_corrupt_or_edited_store_is_refused_with_the_fix(tmp_path):
    from inca.cache import verify_cache
    from inca.cli import cache_main

    build = [*TINY_ARGS, "--task", "synth-colour", "--layers", "3", "--cache-dir", str(tmp_path / "cache")]
    assert cache_main(build) == 0  # good stores are made in this process (quicker); faults meet the real CLI
    store = next((tmp_path / "cache").glob("*/synth-colour-*"))
    layer = store / "val" / "layer_3.npy"
    layer.write_bytes(layer.read_bytes()[:-100])  # truncated
    trained = train(tmp_path, "synth-colour", "--cache", "always", "--layers", "3")
    assert_one_line_error(trained, "layer_3.npy", "truncated", "inca-cache --rebuild")
    assert not (tmp_path / "out" / "results.json").exists()
    assert cache_main([*build, "--rebuild"]) == 0
    verify_cache(store)
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksums see it
    layer.write_bytes(bytes(data))
    verified = train(tmp_path, "synth-colour", "--cache", "always", "--layers", "3", "--verify-cache")
    assert_one_line_error(verified, "val/layer_3.npy does not match its checksum", "--rebuild")
    assert cache_main([*build, "--rebuild"]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shapes"]["val"][0] += 1  # a hand edit
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run("cache", "--verify", str(store), cwd=tmp_path), "manifest.json was edited", "--rebuild")


def test_a_store_is_extended_with_missing_layers_never_refused(tmp_path, monkeypatch):
    from inca.cli import cache_main

    monkeypatch.setenv("INCA_CACHE", str(tmp_path / "cache"))
    assert cache_main([*TINY_ARGS, "--task", "synth-colour", "--layers", "3"]) == 0  # the store a user has
    trained = train(tmp_path, "synth-colour", "--layers", "2,3")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "extending it with layers [2]" in trained.stderr
    assert results(tmp_path)["tasks"]["synth-colour"]["activations"] == "cache"


def test_output_lock_stale_temps_symlinks_and_umask(tmp_path):
    image_folder(tmp_path / "data")
    task = f"folder:{tmp_path / 'data'}"
    out = tmp_path / "out"
    with directory_lock(out, "the output directory"):
        busy = train(tmp_path, task)
    assert_one_line_error(busy, f"in use by process {os.getpid()}")
    stale = out / ".results.json.0123abcd.inca-tmp"
    stale.write_text("left by a killed run")
    elsewhere = tmp_path / "precious.json"
    elsewhere.write_text("keep me")
    (out / "results.json").symlink_to(elsewhere)  # a planted symlink must be replaced, not written through
    old_umask = os.umask(0o022)
    try:
        done = train(tmp_path, task, "--overwrite")
    finally:
        os.umask(old_umask)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists() and elsewhere.read_text() == "keep me"
    assert not (out / "results.json").is_symlink()
    adapter_dir = tmp_path / results(tmp_path)["tasks"][task]["best"]["adapter_dir"]
    for file in [out / "results.json", out / "results.md", *sorted(os.scandir(adapter_dir), key=lambda e: e.name)]:
        mode = stat.S_IMODE(os.stat(file).st_mode)
        assert mode == 0o644, (file, oct(mode))


def test_folder_hygiene_symlink_loops_duplicates_and_classes(tmp_path):
    image_folder(tmp_path / "data")
    (tmp_path / "data" / "dark" / "loop").symlink_to(tmp_path / "data")  # a loop back to the root
    duplicate = tmp_path / "data" / "bright" / "copy.png"
    duplicate.write_bytes((tmp_path / "data" / "bright" / "00.png").read_bytes())
    from inca.cli import cache_main
    from inca.tasks import load_task

    assert cache_main([*TINY_ARGS, "--task", f"folder:{tmp_path / 'data'}", "--layers", "3",
                       "--cache-dir", str(tmp_path / "cache")]) == 0

    task = load_task(f"folder:{tmp_path / 'data'}")
    assert sum(task.sizes().values()) == 25  # 24 images + the copy; the loop adds nothing
    one_class = tmp_path / "single"
    image_folder(one_class)
    for file in (one_class / "bright").iterdir():
        file.unlink()
    (one_class / "bright").rmdir()
    assert_one_line_error(train(tmp_path, f"folder:{one_class}"), "1 class(es)", "at least two")


def test_unreadable_images_are_all_named_then_skipped_on_request(tmp_path):
    image_folder(tmp_path / "data")
    bad = [tmp_path / "data" / "dark" / "99.png", tmp_path / "data" / "bright" / "98.png"]
    for file in bad:
        file.write_bytes(b"\x89PNG not really")
    task = f"folder:{tmp_path / 'data'}"
    assert_one_line_error(train(tmp_path, task), "2 unreadable image(s)", str(bad[0]), str(bad[1]),
                          "--skip-bad-images")
    skipped = train(tmp_path, task, "--skip-bad-images")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    result = results(tmp_path)["tasks"][task]
    assert result["skipped_images"] == 2
    predicted = run("predict", "--adapter", result["best"]["adapter_dir"], "--images", str(tmp_path / "data"),
                    cwd=tmp_path)
    assert predicted.returncode == 1  # some images skipped, the rows of the others written
    assert sorted(line.partition(": cannot")[0] for line in predicted.stderr.splitlines() if "skipped" in line) == \
        sorted(f"inca-predict: skipped {file}" for file in bad)
    assert len(predicted.stdout.splitlines()) == 1 + 24  # header + every good image


def saved_adapter(tmp_path) -> tuple[str, Path, Path, Path, dict[Path, bytes]]:
    """A trained adapter (made in this process, which is quicker; the faults meet the real CLI), an image to
    predict, its weights and config files and their original bytes."""
    from inca.cli import train_main

    assert train_main([*TINY_ARGS, "--tasks", "synth-colour", "--layers", "-1", "--epochs", "1", "--out",
                       str(tmp_path / "out"), "--cache", "never"]) == 0
    adapter = str(tmp_path / results(tmp_path)["tasks"]["synth-colour"]["best"]["adapter_dir"])
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    weights, config = Path(adapter, "adapter.safetensors"), Path(adapter, "adapter_config.json")
    return adapter, image, weights, config, {weights: weights.read_bytes(), config: config.read_bytes()}


def test_damaged_saved_adapters_are_one_line_errors(tmp_path):
    from inca.cli import predict_main

    adapter, image, weights, config, original = saved_adapter(tmp_path)
    cases = [(weights, original[weights][:-7], "does not match"), (weights, b"", "does not match"),
             (config, b"{not json", "is not valid JSON"), (config, b"[]", "not an adapter config")]
    for file, content, needle in cases:
        file.write_bytes(content)
        assert_one_line_error(run("predict", "--adapter", adapter, "--images", str(image), cwd=tmp_path), needle)
        for path, data in original.items():
            path.write_bytes(data)
    assert predict_main(["--adapter", adapter, "--images", str(image)]) == 0


def test_consistent_but_wrong_saved_adapters_name_what_is_wrong(tmp_path, capsys):
    """Files whose checksum and signature match but whose content does not fit: each one line naming the
    problem, found before anything the config asks for is allocated (10^10 queries would be 7 TiB)."""
    from safetensors.torch import load_file

    from inca.adapters.common import write_adapter
    from inca.cli import predict_main

    adapter, image, weights, config, original = saved_adapter(tmp_path)

    def rewrite(change_weights=None, change_config=None) -> None:
        """Saved again, so checksum and signature match the damage."""
        tensors, settings = load_file(weights), json.loads(config.read_text())
        if change_weights:
            change_weights(tensors)
        if change_config:
            change_config(settings)
        write_adapter(adapter, {k: v for k, v in settings.items() if k not in ("format_version", "weights_sha256")},
                     tensors)

    def first(tensors) -> str:
        return sorted(tensors)[0]

    cases = [
        (dict(change_weights=lambda t: t[first(t)].fill_(float("nan"))), "hold NaN or infinity"),
        (dict(change_weights=lambda t: t.update({first(t): t[first(t)][..., :1].clone()})), "wrong shapes"),
        (dict(change_config=lambda c: c["classes"].append("extra")), "class names"),
        (dict(change_config=lambda c: c["members"][0].update(layer=-100)), "layer=-100; expected an integer in [0, 3]"),
        (dict(change_config=lambda c: c["members"][0].update(num_heads=0)), "num_heads=0; expected an integer in"),
        (dict(change_config=lambda c: c["members"][0].update(num_heads="3")), "num_heads='3'; expected an integer"),
        (dict(change_config=lambda c: c["members"][0].update(num_heads=5)), "num_heads=5, which does not divide"),
        (dict(change_config=lambda c: c["members"][0].update(num_queries=10**10)),
         "wrong shapes ['query (1, 192) (expected (10000000000, 192))']"),
        (dict(change_config=lambda c: c["members"][0].update(dim=96)), "dim=96 but its backbone"),
        (dict(change_config=lambda c: c["members"][0].update(mlp_ratio=1e300)), "mlp_ratio=1e+300; expected"),
    ]
    for change, needle in cases:
        capsys.readouterr()
        rewrite(**change)
        assert predict_main(["--adapter", str(adapter), "--images", str(image)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("inca-predict: error: ") and needle in err[0], err
        for path, data in original.items():
            path.write_bytes(data)


def test_progress_is_quiet_in_redirected_logs(tmp_path):
    done = run("train", *TINY_ARGS, "--tasks", "digits", "--layers", "-1", "--epochs", "3", "--out", "out",
               "--cache", "always", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr  # no bar redraws in a log file
    assert len(done.stderr.splitlines()) < 60
    assert "font" not in done.stderr.lower()
    quiet = run("train", *TINY_ARGS, "--tasks", "digits", "--layers", "-1", "--epochs", "3", "--out", "out2",
                "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_full_disk_is_reported_before_writing(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(InCAError, match="needs 1.00 GiB .* only 0.01 GiB are free") as info:
        require_free_space(tmp_path, 2**30, "the store")
    assert "\n" not in str(info.value)
    atomic_write_text(tmp_path / "results.json", "previous good state")

    def disk_full(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(InCAError, match="no space left on .* while writing results.json: .* MiB free"):
        atomic_write(tmp_path / "results.json", disk_full)
    assert (tmp_path / "results.json").read_text() == "previous good state"
    assert not list(tmp_path.glob(".*inca-tmp"))


NEARLY_FULL_DISK = "import shutil\n_usage = shutil.disk_usage\n" \
                   "shutil.disk_usage = lambda path: _usage(path)._replace(free=2**20)"
NO_SPACE_ON_FLUSH = "import errno, os\n" \
                    "def _full(fd): raise OSError(errno.ENOSPC, 'No space left on device')\nos.fsync = _full"


def test_full_disk_through_the_command_line_keeps_the_previous_state(tmp_path):
    from inca.cli import cache_main, train_main

    build = ["cache", *TINY_ARGS, "--task", "synth-colour", "--cache-dir", str(tmp_path / "stores"), "--layers"]
    assert cache_main([*build[1:], "3"]) == 0  # the previous good state, made in this process (quicker)
    stores = {p: p.read_bytes() for p in (tmp_path / "stores").rglob("*") if p.is_file() and p.name != ".inca.lock"}
    refused = run(*build, "2,3", cwd=tmp_path, environment_patch=NEARLY_FULL_DISK)
    assert_one_line_error(refused, "needs", "GiB", "only 0.00 GiB are free", "stores")
    assert [p for p, data in stores.items() if p.read_bytes() != data] == []

    assert train_main([*TINY_ARGS, "--tasks", "synth-colour", "--layers", "-1", "--epochs", "1",
                       "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]) == 0
    before = (tmp_path / "out" / "results.json").read_bytes()
    full = run("train", *TINY_ARGS, "--tasks", "synth-colour,digits", "--layers", "-1", "--epochs", "1", "--out",
               "out", cwd=tmp_path, environment_patch=NO_SPACE_ON_FLUSH)
    assert_one_line_error(full, "no space left on", "MiB free there")
    assert (tmp_path / "out" / "results.json").read_bytes() == before
    assert not list((tmp_path / "out").rglob("*.inca-tmp"))


@pytest.mark.parametrize(("environment_patch", "command"), [
    ("import torch, inca.adapters.inca as m\n"
     "def _oom(*a, **k): raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')\n"
     "m.InCABank.forward = _oom", "train"),
    ("import timm.models.vision_transformer as m\n"
     "def _oom(*a, **k): raise MemoryError()\n"
     "m.VisionTransformer.forward_intermediates = _oom", "cache"),
])
def test_out_of_memory_is_one_line_with_the_fix(tmp_path, environment_patch, command):
    args = ["--tasks", "digits", "--out", "out", "--cache", "never"] if command == "train" else ["--task", "digits"]
    failed = run(command, *TINY_ARGS, *args, "--layers", "-1", "--batch-size", "32", cwd=tmp_path,
                 environment_patch=environment_patch)
    assert_one_line_error(failed, "out of memory", "lower --batch-size (now 32)")


def test_a_store_being_built_is_locked_against_a_second_build(tmp_path):
    from inca.cache import verify_cache
    from inca.cli import cache_main

    build = ["cache", *TINY_ARGS, "--task", "synth-colour", "--layers", "3", "--cache-dir", str(tmp_path / "stores")]
    assert cache_main(build[1:]) == 0
    store = next((tmp_path / "stores").glob("*/synth-colour-*"))
    with directory_lock(store, "the activation store"):  # as a build in progress holds it
        busy = run(*build, "--rebuild", cwd=tmp_path)
    assert_one_line_error(busy, "activation store", f"in use by process {os.getpid()}")
    verify_cache(store)  # the store the second build wanted to delete is intact


def refusing(error: str, prefix: Path) -> str:
    """An environment patch: the process's ``os.open`` fails with ``errno.<error>`` under ``prefix``, as a file
    system does for a user without permission (``EACCES``; root reads any file whatever its mode) or when it
    is mounted read-only (``EROFS``)."""
    return (f"import errno, os\n_open = os.open\n"
            f"def _refusing(path, *args, **kwargs):\n"
            f"    if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith({str(prefix)!r}):\n"
            f"        raise OSError(errno.{error}, os.strerror(errno.{error}), os.fspath(path))\n"
            f"    return _open(path, *args, **kwargs)\n"
            f"os.open = _refusing")


def test_predict_writes_the_good_rows_and_names_each_unreadable_image_or_unwritable_output(tmp_path):
    """Exit code 1 with the rows of every readable image when some cannot be read (a truncated JPEG, a FIFO
    that must not block, a file without permission); an output that cannot be written is exit code 2 before
    the backbone loads. The two readable images are one portrait, stored upright and sideways with its EXIF
    orientation: they get the same row, as their pixels are the same once turned upright."""
    import csv
    import io

    from .test_inference import upright_and_tagged

    adapter, *_ = saved_adapter(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    upright_and_tagged(images / "a.png", images / "b.png")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (images / "c.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    os.mkfifo(images / "d.png")
    locked = images / "e.png"
    Image.new("RGB", (8, 8)).save(locked)
    locked.chmod(0)
    predicted = run("predict", "--adapter", adapter, "--images", str(images), "--output", "p.csv", cwd=tmp_path,
                    environment_patch=refusing("EACCES", locked))
    assert predicted.returncode == 1, predicted.stderr[-2000:]
    assert "Traceback" not in predicted.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [row["path"] for row in rows] == [str(images / "a.png"), str(images / "b.png")]
    assert rows[0]["synth-colour"] == rows[1]["synth-colour"]
    assert rows[0]["synth-colour:probability"] == rows[1]["synth-colour:probability"]
    skipped = [line for line in predicted.stderr.splitlines() if " skipped " in line]
    assert len(skipped) == 3, predicted.stderr[-2000:]
    assert skipped[0].startswith(f"inca-predict: skipped {images / 'c.jpg'}: cannot be read as an image (")
    assert skipped[1] == f"inca-predict: skipped {images / 'd.png'}: cannot be read as an image (not a regular file)"
    assert skipped[2] == f"inca-predict: skipped {locked}: permission denied"
    assert "3 of 5 images could not be read" in predicted.stderr.splitlines()[-1]

    (tmp_path / "read-only").mkdir()
    for output, patch, needle in [
        (images, None, "is a directory"),
        (tmp_path / "read-only" / "p.csv", refusing("EROFS", tmp_path / "read-only"), "(Read-only file system)"),
    ]:
        refused = run("predict", "--adapter", adapter, "--images", str(images / "a.png"), "--output", str(output),
                      cwd=tmp_path, environment_patch=patch)
        assert_one_line_error(refused, f"cannot write predictions to {output}", needle)
        assert "inca.backbone" not in refused.stderr  # refused before the backbone is built
    assert not list((tmp_path / "read-only").iterdir())


def test_a_hand_edited_adapter_config_is_refused_until_re_signed(tmp_path, capsys):
    """Swapping two class names in adapter_config.json would relabel every prediction: refused, naming the
    change, until ``inca-predict --resign`` accepts it; the weights then mean the new names."""
    import hashlib

    from inca.cli import predict_main

    adapter, image, weights, config, _ = saved_adapter(tmp_path)
    settings = json.loads(config.read_text())
    classes = settings["classes"]
    capsys.readouterr()
    assert predict_main(["--adapter", adapter, "--images", str(image), "--top-k", "2"]) == 0
    before = capsys.readouterr().out.splitlines()[1].split(",")[1].split(";")  # this image's top two classes
    first, second = (classes.index(name) for name in before)
    classes[first], classes[second] = classes[second], classes[first]
    config.write_text(json.dumps(settings, indent=2))
    refused = run("predict", "--adapter", adapter, "--images", str(image), cwd=tmp_path)
    assert_one_line_error(refused, "adapter_config.json was edited after it was saved with its weights",
                          f'classes[{min(first, second)}]: "{classes[max(first, second)]}" -> '
                          f'"{classes[min(first, second)]}"', f"inca-predict --resign {adapter}")
    signed = run("predict", "--resign", adapter, cwd=tmp_path)
    assert signed.returncode == 0 and signed.stdout.startswith(f"{adapter}: signed (classes["), signed.stderr[-2000:]
    assert predict_main(["--adapter", adapter, "--images", str(image), "--top-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split(",")[1].split(";") == before[::-1]

    weights.write_bytes(b"{garbage" * 64)  # damaged weights whose checksum was recorded anyway
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}))
    assert_one_line_error(run("predict", "--adapter", adapter, "--images", str(image), cwd=tmp_path),
                          "is not a readable safetensors file")
