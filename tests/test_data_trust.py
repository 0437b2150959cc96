"""Results a user can trust, through the real command line: a checkpoint, a probe result or a report is reused only
for the run and the data it was made from, ranks with other flags are refused, nothing is written or deleted through
a symlink, a failed rerun keeps the previous report, and impossible sizes, seeds and devices are one line (exit 2)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import TINY_ARGS, TINY_KWARGS
from .test_bad_input import assert_one_line_error
from .test_distributed import free_port
from .test_faults import image_folder, run

pytestmark = pytest.mark.slow

PROBE_TASK = ["--tasks", "synth-colour", "--layers", "-1"]
TASK = [*PROBE_TASK, "--cache", "never"]


def train_args(tmp_path: Path, *extra: str, backbone: list[str] = TINY_ARGS) -> list[str]:
    return [*backbone, *TASK, "--epochs", "2", "--out", str(tmp_path / "out"), *extra]


def interrupted(tmp_path: Path, monkeypatch) -> Path:
    """A new inca-train run into ``tmp_path/out`` stopped (as by Ctrl-C) right after its first epoch's checkpoint,
    made in this process (quicker); the checkpoint it left."""
    import inca.train.bank as bank
    from inca.cli import train_main

    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    save = bank._save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(bank, "_save_checkpoint", save_then_stop)
        assert train_main(train_args(tmp_path)) == 130
    return next((tmp_path / "out").glob("*/checkpoint.safetensors"))


def other_weights(tmp_path: Path) -> list[str]:
    """Backbone flags of the same architecture with other weights than ``--weights random``'s."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_KWARGS)
    save_file(model.state_dict(), tmp_path / "other.safetensors")
    return ["--backbone", "vit_tiny_patch16_224", "--weights", str(tmp_path / "other.safetensors"),
            "--model-kwargs", "img_size=32", "patch_size=8", "depth=4"]


def test_a_checkpoint_is_resumed_only_by_the_configuration_that_made_it(tmp_path, monkeypatch, caplog):
    for rerun in ([*train_args(tmp_path, "--overwrite", backbone=other_weights(tmp_path))],
                  [*train_args(tmp_path, "--overwrite", "--augment")]):
        interrupted(tmp_path, monkeypatch)
        done = run("train", *rerun, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "is a checkpoint of another configuration: starting this run from scratch" in done.stderr
        assert "resuming bank training" not in done.stderr
    from inca.cli import train_main

    interrupted(tmp_path, monkeypatch)
    assert train_main(train_args(tmp_path, "--overwrite")) == 0  # the same configuration does resume
    assert "resuming bank training" in caplog.text


def test_a_damaged_checkpoint_is_discarded_with_a_warning(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file

    def wrong_shapes(checkpoint: Path) -> None:
        with safe_open(checkpoint, framework="pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        name = next(k for k in sorted(tensors) if k.startswith("bank.") and tensors[k].shape[-1:] > (1,))
        tensors[name] = tensors[name][..., :1].clone()
        save_file(tensors, checkpoint, metadata=metadata)  # its configuration still matches the run's

    for damage, needle in [(lambda c: c.write_bytes(b"not a checkpoint"), "is damaged"),
                           (wrong_shapes, "its tensors do not fit this bank")]:
        damage(interrupted(tmp_path, monkeypatch))
        done = run("train", *train_args(tmp_path), cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert needle in done.stderr and "starting this run from scratch" in done.stderr
        assert not list((tmp_path / "out").glob("*/checkpoint.safetensors"))


def test_ranks_started_with_other_flags_are_refused(tmp_path):
    """Two ranks of one launch (the variables torchrun sets), rank 1 given another --lr: both refuse in one line."""
    port = free_port()
    ranks = []
    for rank in range(2):
        environment = {**os.environ, "INCA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                       "LOCAL_RANK": str(rank)}
        command = [sys.executable, "-m", "inca", "train", *TINY_ARGS, *TASK, "--epochs", "1", "--out", "out",
                   *(["--lr", "0.5"] if rank else [])]
        ranks.append(subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for process in ranks:
        stdout, stderr = process.communicate(timeout=300)
        finished = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert_one_line_error(finished, "rank 1 was started with another configuration than rank 0 (differs in lr)")
    assert not (tmp_path / "out" / "results.json").exists()


def test_probe_results_are_reused_only_for_the_same_data(tmp_path):
    from inca.cli import probe_main

    image_folder(tmp_path / "data")
    probe = ["probe", *TINY_ARGS, "--tasks", f"folder:{tmp_path / 'data'}", "--layers", "-1", "--probes", "linear",
             "--pool", "mean", "--out", str(tmp_path / "out")]
    assert probe_main(probe[1:]) == 0  # the earlier run, made in this process (quicker)
    first = json.loads((tmp_path / "out" / "probe.json").read_text())["tasks"]
    (tmp_path / "data" / "dark").rename(tmp_path / "data" / "swap")  # two classes swap their images
    (tmp_path / "data" / "bright").rename(tmp_path / "data" / "dark")
    (tmp_path / "data" / "swap").rename(tmp_path / "data" / "bright")
    again = run(*probe, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "data changed since it was probed; running it again" in again.stderr
    assert "finished in an earlier run" not in again.stderr
    second = json.loads((tmp_path / "out" / "probe.json").read_text())["tasks"]
    assert [r["fingerprint"] for r in second.values()] != [r["fingerprint"] for r in first.values()]


def test_nothing_is_written_or_deleted_through_a_symlinked_store_or_output(tmp_path):
    from inca.cli import cache_main

    build = ["cache", *TINY_ARGS, "--task", "synth-colour", "--layers", "3", "--cache-dir", str(tmp_path / "stores")]
    assert cache_main(build[1:]) == 0
    store = next((tmp_path / "stores").glob("*/synth-colour-*"))
    elsewhere = tmp_path / "elsewhere"
    shutil.move(store, elsewhere)
    store.symlink_to(elsewhere, target_is_directory=True)
    kept = {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    assert_one_line_error(run(*build, "--rebuild", cwd=tmp_path), "is a symlink", "never writes or deletes")
    assert {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == kept

    (tmp_path / "real-out").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real-out", target_is_directory=True)
    trained = run("train", *TINY_ARGS, *TASK, "--epochs", "1", "--out", "out", cwd=tmp_path)
    assert_one_line_error(trained, "--out out is a symlink")
    assert list((tmp_path / "real-out").iterdir()) == []


READ_ONLY = "import os\n_access = os.access\n" \
            "os.access = lambda p, m, **k: False if 'read-only' in str(p) and m & os.W_OK else _access(p, m, **k)"
ADAPTER_DISK_FULL = (
    "import safetensors, safetensors.torch as st\n_save = st.save_file\n"
    "def _full(tensors, filename, *a, **k):\n"
    "    if 'adapter.safetensors' in str(filename):\n"
    "        raise safetensors.SafetensorError(f'Error while serializing: I/O error: No space left on device '\n"
    "                                          f'(os error 28) at path \"{filename}\"')\n"
    "    return _save(tensors, filename, *a, **k)\n"
    "st.save_file = _full"
)


@pytest.mark.parametrize(("out", "needle"), [
    ("a-file", "--out a-file is a file, not a directory"),
    ("a-file/below", "is below the file"),
    ("read-only/out", "cannot be written"),
    ("locked", "its .inca.lock is a symlink"),
])
def test_an_output_directory_that_cannot_be_one_is_one_line(tmp_path, out, needle):
    (tmp_path / "a-file").write_text("a file")
    (tmp_path / "read-only").mkdir(mode=0o555)  # as root, only the patch below makes it read-only
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / ".inca.lock").symlink_to(tmp_path / "a-file")
    failed = run("train", *TINY_ARGS, *TASK, "--epochs", "1", "--out", out, cwd=tmp_path, environment_patch=READ_ONLY)
    assert_one_line_error(failed, needle)
    assert (tmp_path / "a-file").read_text() == "a file" and not (tmp_path / "read-only" / "out").exists()


def test_a_full_disk_while_saving_an_adapter_is_one_line(tmp_path):
    failed = run("train", *TINY_ARGS, *TASK, "--epochs", "1", "--out", "out", cwd=tmp_path,
                 environment_patch=ADAPTER_DISK_FULL)
    assert_one_line_error(failed, "no space left on", "adapter.safetensors", "MiB free there")
    assert not list((tmp_path / "out").rglob("*.inca-tmp"))


SECOND_TASK_OUT_OF_MEMORY = (
    "import inca.training as s\n_train = s.train_inca_task\n_calls = []\n"
    "def _second_fails(*a, **k):\n"
    "    _calls.append(1)\n"
    "    if len(_calls) == 2:\n"
    "        raise MemoryError()\n"
    "    return _train(*a, **k)\n"
    "s.train_inca_task = _second_fails"
)


def test_a_failed_overwrite_keeps_the_previous_report_until_the_new_one_is_complete(tmp_path):
    from inca.cli import train_main

    out = tmp_path / "out"
    assert train_main([*TINY_ARGS, *TASK, "--epochs", "1", "--out", str(out)]) == 0
    previous = {name: (out / name).read_bytes() for name in ("results.json", "results.md")}
    rerun = ["train", *TINY_ARGS, "--tasks", "synth-colour,digits", "--layers", "-1", "--cache", "never",
             "--epochs", "1", "--lr", "3e-3", "--out", "out", "--overwrite"]
    failed = run(*rerun, cwd=tmp_path, environment_patch=SECOND_TASK_OUT_OF_MEMORY)
    assert_one_line_error(failed, "out of memory")
    assert {name: (out / name).read_bytes() for name in previous} == previous
    partial = json.loads((out / ".inca-replacing" / "results.json").read_text())
    assert list(partial["tasks"]) == ["synth-colour"] and partial["config"]["lr"] == [3e-3]

    finished = run(*rerun, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming the replacement" in finished.stderr
    assert "synth-colour: finished in an earlier run" in finished.stderr
    report = json.loads((out / "results.json").read_text())
    assert list(report["tasks"]) == ["synth-colour", "digits"] and report["config"]["lr"] == [3e-3]
    assert not (out / ".inca-replacing").exists()


def test_forged_unit_results_are_skipped(tmp_path):
    from inca.cli import train_main
    from inca.io import digest

    out = tmp_path / "out"
    assert train_main([*TINY_ARGS, *TASK, "--epochs", "1", "--out", str(out)]) == 0
    before = json.loads((out / "results.json").read_text())
    config = before["config"]
    units = out / ".inca-units"
    units.mkdir()
    (units / "garbage.json").write_text("{not json")
    (units / "list.json").write_text("[1, 2]")
    (units / "no-key.json").write_text(json.dumps({"config": config, "result": {}}))
    (units / "renamed.json").write_text(json.dumps({"config": config, "key": "digits", "result": {}}))
    (units / f"{digest('digits')}.json").write_text(json.dumps({"config": config, "key": "digits", "result": 5}))
    rerun = run("train", *TINY_ARGS, *TASK, "--epochs", "1", "--out", "out", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stderr.count("is not a unit result a rank wrote") == 3
    after = json.loads((out / "results.json").read_text())
    assert after["tasks"].keys() == before["tasks"].keys() and not list(units.iterdir())


PROBE_REPORTS = {"not-json.json": "{nope", "list.json": "[1, 2]",
                 "no-ranking.json": json.dumps({"tasks": {"synth-colour": {"results": {}}}})}
ALLOCATION_FAILS = (
    "import inca.adapters.inca as m\n"
    "def _fails(*a, **k):\n"
    "    raise RuntimeError('[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can\\'t '\n"
    "                       'allocate memory: you tried to allocate 768000000000 bytes. Error code 12')\n"
    "m.InCABank.forward = _fails"
)
NO_CLASS_TOKEN = ["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--model-kwargs", "img_size=32",
                  "patch_size=8", "depth=4", "class_token=False", "global_pool=avg"]


@pytest.mark.parametrize(("args", "needle"), [
    (["train", *TINY_ARGS, *TASK, "--queries", "1000000000"], "lower --queries, --mlp-ratio"),
    (["train", *TINY_ARGS, *TASK, "--mlp-ratio", "1e9"], "lower --queries, --mlp-ratio"),
    (["train", *TINY_ARGS, *TASK, "--seed", str(2**70)], "--seed: expected an integer >= 0 and <= 4294967295"),
    (["train", *TINY_ARGS, *TASK, "--split-seed", str(2**70)], "--split-seed: expected an integer >= 0 and <="),
    (["train", *TINY_ARGS, *TASK, "--adapter-seeds", f"0,{2**70}"], "--adapter-seeds: expected an integer >= 0"),
    (["probe", *TINY_ARGS, *PROBE_TASK, "--seed", str(2**32)], "--seed: expected an integer >= 0 and <= 4294967295"),
    (["train", "--backbone", "vit_tiny_patch16_224", "--weights", "random", "--model-kwargs", "depth=0", *TASK],
     "was built with no blocks"),
    (["train", *TINY_ARGS, *TASK, "--device", "cuda:7"], "--device cuda:7 was asked for"),
    (["probe", *NO_CLASS_TOKEN, *PROBE_TASK, "--probes", "linear", "--pool", "cls"], "has no class token"),
    *[(["train", *TINY_ARGS, *TASK, "--layers", "best:1", "--probe-report", name], f"probe report {name}")
      for name in PROBE_REPORTS],
])
def test_impossible_values_are_one_line(tmp_path, args, needle):
    for name, content in PROBE_REPORTS.items():
        (tmp_path / name).write_text(content)
    assert_one_line_error(run(*args, "--out", "out", cwd=tmp_path), needle)
    assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out" / "probe.json").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_mps_is_one_line(tmp_path):
    failed = run("train", *TINY_ARGS, *TASK, "--out", "out", "--device", "mps", cwd=tmp_path)
    assert_one_line_error(failed, "--device mps was asked for but MPS")


def test_a_failed_allocation_is_the_out_of_memory_line(tmp_path):
    failed = run("train", *TINY_ARGS, *TASK, "--epochs", "1", "--out", "out", "--batch-size", "32", cwd=tmp_path,
                 environment_patch=ALLOCATION_FAILS)
    assert_one_line_error(failed, "out of memory", "DefaultCPUAllocator", "lower --batch-size (now 32)")
