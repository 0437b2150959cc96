"""The suite runner: skips finished units, writes after each, refuses another configuration unless overwrite."""

import functools
import json
import os
import time
from pathlib import Path

import pytest
import torch

from inca.errors import InCAError
from inca.suite import UNITS_DIR, Unit, run_suite

from .test_distributed import free_port


class Recorder:
    """Runs units by name, failing on ``fail``; records which ran and what the report held at each write."""

    def __init__(self, fail: str | None = None):
        self.ran: list[str] = []
        self.writes: list[list[str]] = []
        self.fail = fail

    def units(self, names):
        return [Unit(name, name, lambda name=name: self.run(name)) for name in names]

    def run(self, name):
        if name == self.fail:
            raise RuntimeError(f"{name} failed")
        self.ran.append(name)
        return {"value": len(name)}

    def write(self, out, report):
        self.writes.append(list(report["tasks"]))
        (out / "report.md").write_text(", ".join(report["tasks"]))


def fresh(**config):
    return {"config": {"lr": 1e-3, **config}, "tasks": {}}


def suite(tmp_path, recorder, names, config=None, **kwargs):
    return run_suite(tmp_path, "report.json", fresh(**(config or {})), recorder.units(names), recorder.write, **kwargs)


def test_runs_in_order_writes_after_each_and_skips_finished(tmp_path):
    first = Recorder()
    report = suite(tmp_path, first, ["a", "bb"])
    assert first.ran == ["a", "bb"]
    assert first.writes == [["a"], ["a", "bb"], ["a", "bb"]]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    one_process = {"rank": 0, "world_size": 1, "data_parallel": False}
    assert report["tasks"] == {"a": {"value": 1, **one_process}, "bb": {"value": 2, **one_process}}

    again = Recorder()
    report = suite(tmp_path, again, ["bb", "ccc"])
    assert again.ran == ["ccc"]
    assert list(report["tasks"]) == ["a", "bb", "ccc"]
    assert (tmp_path / "report.md").read_text() == "a, bb, ccc"


def test_an_interrupted_suite_keeps_finished_units(tmp_path):
    with pytest.raises(RuntimeError, match="bb failed"):
        suite(tmp_path, Recorder(fail="bb"), ["a", "bb", "ccc"])
    assert list(json.loads((tmp_path / "report.json").read_text())["tasks"]) == ["a"]
    resumed = Recorder()
    suite(tmp_path, resumed, ["a", "bb", "ccc"])
    assert resumed.ran == ["bb", "ccc"]


def test_another_configuration_is_refused_unless_overwrite(tmp_path):
    suite(tmp_path, Recorder(), ["a"], config={"seed": 0})
    with pytest.raises(InCAError, match=r"another configuration \(differs in lr, seed\).*--overwrite"):
        suite(tmp_path, Recorder(), ["a"], config={"lr": 3e-3, "seed": 1})
    with pytest.raises(InCAError, match=r"differs in extra"):
        suite(tmp_path, Recorder(), ["a"], config={"seed": 0, "extra": (1, 2)})
    rerun = Recorder()
    report = suite(tmp_path, rerun, ["a"], config={"seed": 1}, overwrite=True)
    assert rerun.ran == ["a"] and report["config"]["seed"] == 1


def test_configuration_compares_as_json(tmp_path):
    """Tuples in a configuration read back as lists: still the same configuration."""
    suite(tmp_path, Recorder(), ["a"], config={"grid": (1, 2)})
    rerun = Recorder()
    suite(tmp_path, rerun, ["a"], config={"grid": (1, 2)})
    assert rerun.ran == []


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "is unreadable"), ('{"format_version": 7, "config": {"lr": 0.001}, "tasks": {}}',
                                      "another inca version"), ("[]", "another inca version")],
)
def test_unreadable_or_foreign_report_is_refused_unless_overwrite(tmp_path, content, message):
    (tmp_path / "report.json").write_text(content)
    with pytest.raises(InCAError, match=message):
        suite(tmp_path, Recorder(), ["a"])
    assert list(suite(tmp_path, Recorder(), ["a"], overwrite=True)["tasks"]) == ["a"]


def test_custom_layout_of_results(tmp_path):
    """Results in a list, found by a key inside each record (inca-compare's layout)."""
    recorder = Recorder()
    report = {"config": {}, "results": []}

    def finished(report, key):
        return any(r["key"] == key for r in report["results"])

    def store(report, key, result):
        report["results"].append({"key": key, **result})

    units = recorder.units(["a", "bb"])
    out = run_suite(tmp_path, "r.json", report, units, lambda out, r: None, finished=finished, store=store)
    one_process = {"rank": 0, "world_size": 1, "data_parallel": False}
    assert out["results"] == [{"key": "a", "value": 1, **one_process}, {"key": "bb", "value": 2, **one_process}]
    again = Recorder()
    run_suite(tmp_path, "r.json", {"config": {}, "results": []}, again.units(["bb"]), lambda out, r: None,
              finished=finished, store=store)
    assert again.ran == []


def _suite_rank(rank: int, size: int, port: int, out: str, names: list[str], fail: str | None, writes: str) -> None:
    """One rank of a shared suite: units ``names`` (``fail`` raises), rank 0 finishing each unit only once another
    rank has left a result; rank 0 records every report it writes and how many unit result files it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    from inca.distributed import launch

    launch()
    left = Path(out) / UNITS_DIR

    def run(name: str) -> dict:
        if name == fail:
            raise RuntimeError(f"{name} failed")
        while rank == 0 and fail is None and not any(left.glob("*.json")):
            time.sleep(0.01)
        return {"value": len(name)}

    def write(out: Path, report: dict) -> None:
        with open(writes, "a", encoding="utf-8") as f:
            f.write(json.dumps({"tasks": list(report["tasks"]), "left": len(list(left.glob("*.json")))}) + "\n")

    units = [Unit(name, name, functools.partial(run, name)) for name in names]
    run_suite(out, "report.json", fresh(), units, write)


def shared_suite(tmp_path, names, fail=None):
    """The suite on two ranks (torch.multiprocessing) into ``tmp_path / "out"``; the reports rank 0 wrote."""
    out, writes = tmp_path / "out", tmp_path / "writes.jsonl"
    torch.multiprocessing.spawn(_suite_rank, args=(2, free_port(), str(out), names, fail, str(writes)), nprocs=2)
    return out, [json.loads(line) for line in writes.read_text().splitlines()]


@pytest.mark.slow
def test_shared_units_show_in_interim_reports_in_unit_order_while_their_files_stay(tmp_path):
    out, writes = shared_suite(tmp_path, ["a", "bb", "ccc"])
    interim = writes[0]  # after rank 0's first unit, which ends only once the other rank has left a result
    assert len(interim["tasks"]) >= 2 and interim["tasks"] == [k for k in ("a", "bb", "ccc") if k in interim["tasks"]]
    # what the report shows is still in its rank's file (the other rank may have left one more since it was read)
    assert interim["left"] >= len(interim["tasks"])
    report = json.loads((out / "report.json").read_text())
    assert list(report["tasks"]) == ["a", "bb", "ccc"] == writes[-1]["tasks"]
    assert writes[-1]["left"] == 3 and not list((out / UNITS_DIR).glob("*.json"))  # files go once the report holds them
    assert {r["rank"] for r in report["tasks"].values()} == {0, 1}
    assert all(r["world_size"] == 2 and not r["data_parallel"] for r in report["tasks"].values())


@pytest.mark.slow
def test_results_a_failed_shared_run_left_are_merged_by_the_next_run(tmp_path):
    names = ["a", "bb", "ccc", "dddd"]
    with pytest.raises(Exception, match="dddd failed"):  # claimed last: a rank that claims it has left a result
        shared_suite(tmp_path, names, fail="dddd")
    out = tmp_path / "out"
    resumed = Recorder()
    report = suite(out, resumed, names)
    shared = [name for name in names if name not in resumed.ran]
    assert shared and "dddd" in resumed.ran
    assert set(report["tasks"]) == set(names)
    assert all(report["tasks"][name]["world_size"] == 2 for name in shared)
    assert all(report["tasks"][name]["world_size"] == 1 for name in resumed.ran)
    assert not list((out / UNITS_DIR).glob("*.json"))


def test_a_folder_resumes_under_any_spelling_and_replaces_its_entry_named_the_old_way(tmp_path, monkeypatch, caplog):
    """Trained as ``folder:data``, the task is finished for ``folder:/abs/data/``: one entry (keyed by the canonical
    spec, the spelling as typed recorded), one directory named after the folder. An entry a report recorded under
    the typed path (inca before canonical specs) is trained again and replaced, with a warning: never two rows."""
    from PIL import Image

    from inca.cli import train_main

    from .conftest import TINY_ARGS

    for c, name in enumerate(["dark", "bright"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (200 * c + i,) * 3).save(tmp_path / "data" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    args = [*TINY_ARGS, "--layers", "-1", "--epochs", "1", "--lr", "1e-3", "--queries", "4", "--out", "out"]
    canonical = f"folder:{(tmp_path / 'data').resolve()}"

    def entries():
        return json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]

    assert train_main([*args, "--tasks", "folder:data"]) == 0
    first = entries()
    assert list(first) == [canonical] and first[canonical]["typed_spec"] == "folder:data"
    directory = first[canonical]["directory"]
    assert directory == f"data-{first[canonical]['fingerprint'][:8]}"
    with caplog.at_level("INFO"):
        assert train_main([*args, "--tasks", f"folder:{tmp_path / 'data'}/"]) == 0
    assert "finished in an earlier run, skipped" in caplog.text and entries() == first

    old = {**entries()}  # as an earlier inca version wrote it: keyed by the path as typed
    (tmp_path / "out" / "results.json").write_text(json.dumps({**json.loads(
        (tmp_path / "out" / "results.json").read_text()), "tasks": {"folder:data": old[canonical]}}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert train_main([*args, "--tasks", "folder:./data"]) == 0
    assert list(entries()) == [canonical] and "recorded as folder:data by an inca version" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == [directory]
