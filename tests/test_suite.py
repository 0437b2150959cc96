"""The suite runner: skips finished units, writes after each, refuses another configuration unless overwrite."""

import json

import pytest

from inca.errors import InCAError
from inca.suite import Unit, run_suite


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


def test_interim_reports_show_results_ranks_left_in_unit_order_and_keep_their_files(tmp_path):
    from inca.io import atomic_write_json
    from inca.suite import _put_in_tasks, _unit_file, _write_interim

    report = fresh()
    report["tasks"]["done"] = {"value": 0}
    for key in ("b", "a"):  # arrive out of order
        atomic_write_json(_unit_file(tmp_path, key), {"config": report["config"], "key": key, "result": {"v": key}})
    atomic_write_json(_unit_file(tmp_path, "c"), {"config": {"lr": 1.0}, "key": "c", "result": {"v": "c"}})
    saved = []
    _write_interim(tmp_path, report, _put_in_tasks, ["a", "b", "c"], saved.append)
    assert [list(r["tasks"]) for r in saved] == [["done", "a", "b"]]
    assert list(report["tasks"]) == ["done"]  # the report itself unchanged
    assert _unit_file(tmp_path, "a").is_file() and _unit_file(tmp_path, "b").is_file()
