"""Many processes through torch.distributed (gloo, 2 CPU ranks): shared units give a single process's results, a
sharded store is byte-identical, data-parallel training is the global batch's, LoRA-GA starts the same on every
rank, and a run that lost a rank is completed by a rerun."""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from inca.distributed import SOLO, World, acting_as

from .conftest import TINY_ARGS

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # torchrun's default per rank; the single-process runs match it


def test_a_world_of_one_is_the_whole_work():
    batches = [np.arange(0, 4), np.arange(4, 7)]
    assert [(b, share) for b, share in SOLO.sharded(batches, lambda parts: [p.tolist() for p in parts])] \
        == [([0, 1, 2, 3], 1.0), ([4, 5, 6], 1.0)]
    assert list(SOLO.claimed(3)) == [0, 1, 2]
    assert SOLO.all_reduce_(torch.ones(2)).tolist() == [1.0, 1.0] and SOLO.broadcast("x") == "x"


def test_without_a_store_units_are_striped_over_the_ranks():
    assert [list(World(rank, 3).claimed(7)) for rank in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]


def test_shards_of_a_global_batch_cover_it_once_weighted_by_size():
    batches = [np.arange(0, 6), np.arange(6, 8)]  # the last global batch is short: one rank gets nothing of it
    parts = {rank: list(World(rank, 3).sharded(batches, lambda parts: [p.tolist() for p in parts]))
             for rank in range(3)}
    assert [p for rank in range(3) for p, _ in parts[rank][:1]] == [[0, 1], [2, 3], [4, 5]]
    assert [p for rank in range(3) for p, _ in parts[rank][1:]] == [[6], [7], None]
    for step in range(2):
        assert sum(share for rank in range(3) for _, share in parts[rank][step : step + 1]) == pytest.approx(1.0)


def inca(*args: str, cwd: Path, ranks: int = 1, env: dict | None = None, wait: bool = True):
    """``python -m inca ...``, under ``torchrun --nproc_per_node ranks`` when ``ranks`` > 1."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command = [sys.executable, *(launcher if ranks > 1 else []), "-m", "inca", *args]
    environment = {**os.environ, "INCA_CACHE": str(cwd / "cache"), **ONE_THREAD, **(env or {})}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def inca_here(*args: str, cache: Path) -> int:
    """The same command in this process, on one thread like each torchrun rank (the reference runs)."""
    from inca.__main__ import COMMANDS

    threads, old_cache = torch.get_num_threads(), os.environ.get("INCA_CACHE")
    torch.set_num_threads(1)
    os.environ["INCA_CACHE"] = str(cache)
    try:
        return COMMANDS[args[0]](list(args[1:]))
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("INCA_CACHE") if old_cache is None else os.environ.update(INCA_CACHE=old_cache)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".inca.lock"}


def comparable(result: dict) -> dict:
    """A task's results without what differs between runs by nature (times, paths, who ran it)."""
    drop = {"seconds", "rank", "world_size", "data_parallel", "adapter_dir", "cache_path"}
    return json.loads(json.dumps(result), object_hook=lambda d: {k: v for k, v in d.items() if k not in drop})


def wait_for(process: subprocess.Popen, condition, timeout: float = 300) -> bool:
    """Poll until ``condition()`` holds while ``process`` still runs (False: it ended first, or time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return bool(worker_pids(process.pid))
        time.sleep(0.02)
    return False


def worker_pids(parent: int) -> list[int]:
    """The processes ``parent`` started (torchrun's ranks)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
def test_sharded_store_is_byte_identical_and_data_parallel_training_is_the_global_batch(tmp_path):
    """One task on two ranks: its store is built in two shards (one rank killed half way, then resumed), and
    its bank trains data-parallel; compared with one process building the store and training at twice the
    per-rank batch."""
    train = ["train", *TINY_ARGS, "--tasks", "synth-count", "--layers", "1,3", "--lr", "1e-3,3e-3", "--epochs", "2",
             "--cache", "always"]
    sharded_env = {"INCA_CACHE": str(tmp_path / "two")}
    killed = inca("cache", *TINY_ARGS, "--task", "synth-count", "--layers", "1,3", "--batch-size", "16",
                  "--commit-seconds", "0", cwd=tmp_path, ranks=2, env=sharded_env, wait=False)

    def first_shard_half_written() -> bool:  # rank 0's shard of the train split is rows 0..511
        try:
            rows = json.loads(next((tmp_path / "two").glob("*/*/train/progress-0.json")).read_text())["rows"]
        except (StopIteration, OSError, ValueError):
            return False
        return 0 < rows < 400

    assert wait_for(killed, first_shard_half_written)
    os.kill(worker_pids(killed.pid)[0], signal.SIGKILL)  # one rank dies mid-shard; torchrun stops the other
    killed.communicate(timeout=300)
    assert killed.returncode != 0
    # The training run finds the unfinished store, resumes every shard (whoever wrote it), then trains on it.
    parallel = inca(*train, "--batch-size", "16", "--out", "dp", cwd=tmp_path, ranks=2, env=sharded_env)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert "[rank 1/2]" in parallel.stderr and parallel.stdout.count("| synth-count") == 1  # only rank 0 prints

    assert inca_here(*train, "--batch-size", "32", "--out", str(tmp_path / "sp"), cache=tmp_path / "one") == 0
    sharded, single = store_files(tmp_path / "two"), store_files(tmp_path / "one")
    assert sharded.keys() == single.keys() and len(sharded) == 10  # manifest + 3 x (labels + 2 layers)
    assert [name for name in sharded if sharded[name] != single[name]] == []
    assert inca_here("cache", "--verify", str(next((tmp_path / "two").glob("*/synth-count-*"))),
                     cache=tmp_path / "two") == 0

    dp = json.loads((tmp_path / "dp" / "results.json").read_text())["tasks"]["synth-count"]
    sp = json.loads((tmp_path / "sp" / "results.json").read_text())["tasks"]["synth-count"]
    assert dp["data_parallel"] and dp["world_size"] == 2 and dp["steps"] == sp["steps"]
    for a, b in zip(dp["adapters"], sp["adapters"]):
        assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], abs=1e-3)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=0.011)  # a prediction or two may flip
    assert (tmp_path / dp["best"]["adapter_dir"]).is_dir()


@pytest.mark.slow
def test_shared_units_survive_a_killed_rank_and_equal_a_single_process(tmp_path):
    tasks = "synth-colour,digits,synth-orientation,synth-shapes"  # two left at least when the first ends
    train = ["train", *TINY_ARGS, "--tasks", tasks, "--layers", "-1", "--epochs", "2", "--cache", "never"]
    running = inca(*train, "--out", "shared", cwd=tmp_path, ranks=2, wait=False)
    assert wait_for(running, lambda: any((tmp_path / "shared" / ".inca-units").glob("*.json")))
    os.kill(worker_pids(running.pid)[0], signal.SIGKILL)
    running.communicate(timeout=300)
    assert running.returncode != 0
    left = list((tmp_path / "shared" / ".inca-units").glob("*.json"))
    assert left  # the unit a rank finished before the kill is kept

    rerun = inca(*train, "--out", "shared", cwd=tmp_path, ranks=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "merged" in rerun.stderr and "[rank 0/2]" in rerun.stderr
    shared = json.loads((tmp_path / "shared" / "results.json").read_text())["tasks"]
    assert set(shared) == set(tasks.split(","))
    assert all(r["world_size"] == 2 and r["rank"] in (0, 1) and not r["data_parallel"] for r in shared.values())
    assert not list((tmp_path / "shared" / ".inca-units").glob("*.json"))

    assert inca_here(*train, "--out", str(tmp_path / "alone"), cache=tmp_path / "cache") == 0
    single = json.loads((tmp_path / "alone" / "results.json").read_text())["tasks"]
    assert list(single) == tasks.split(",")
    for spec in single:
        assert comparable(shared[spec]) == comparable(single[spec]), spec  # bit-identical on CPU


def _lora_ga_rank(rank: int, size: int, port: int, out: str) -> None:
    """One rank of the LoRA-GA check: its shards of the first global batches, then the layers it initialised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    from inca.distributed import launch

    launch()
    torch.save(_lora_ga_init(batch_size=4), f"{out}/rank{rank}.pt")


def _lora_ga_init(batch_size: int) -> dict[str, torch.Tensor]:
    import timm

    from inca.activations import TensorBatches
    from inca.adapters.lora import apply_lora, lora_layers
    from inca.adapters.lora_ga import estimate_gradients, init_lora_ga
    from inca.methods.base import ApplyContext
    from inca.train.e2e import batch_loss

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    apply_lora(model, rank=2)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(24, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (24,), generator=generator)
    data = TensorBatches({"train": images}, {"train": labels})
    context = ApplyContext(data, batch_size, seed=0, device=torch.device("cpu"))
    loss = functools.partial(batch_loss, device=torch.device("cpu"))
    gradients = estimate_gradients(model, lora_layers(model), context.train_batches(3), loss)
    init_lora_ga(model, context.train_batches(3), loss)
    return {**{f"{name}.grad": grad for name, grad in gradients.items()},
            **{f"{name}.{part}": getattr(layer, part).detach().clone() for name, layer in lora_layers(model).items()
               for part in ("lora_A", "lora_B")}}


@pytest.mark.slow
def test_lora_ga_starts_the_same_on_every_rank_from_the_global_gradient(tmp_path):
    torch.multiprocessing.spawn(_lora_ga_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    with acting_as(SOLO):
        reference = _lora_ga_init(batch_size=8)  # one process on the same global batches
    for key, value in reference.items():  # singular vectors are defined up to sign: compare magnitudes
        if key.endswith(".grad"):
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(ranks[0][key].abs(), value.abs(), rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_progress_lines_count_the_units_each_rank_runs(tmp_path):
    """Under torchrun a rank's progress lines are paced by tenths of the whole command, as in one process: a line
    names the claimed unit's place in the whole command, so the later units log too, under their own numbers (each
    rank runs about two of the four: counting only its own would never name unit 3 or 4)."""
    tasks = "synth-colour,digits,synth-orientation,synth-shapes"  # one rank at least runs two of them
    run = inca("train", *TINY_ARGS, "--tasks", tasks, "--layers", "-1", "--epochs", "1", "--cache", "never",
               "--out", "shared", cwd=tmp_path, ranks=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "unit 3 of 4)" in run.stderr or "unit 4 of 4)" in run.stderr, run.stderr[-3000:]
