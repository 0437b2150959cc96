"""Suites: units of work (tasks, or (task, method) pairs) run one after another on one loaded backbone.

After each unit the suite's report is rewritten atomically, so an interrupted suite loses at most the unit that
was running, and a rerun into the same directory with the same configuration skips every finished unit. A report
of another configuration is never silently replaced: that takes ``overwrite``. :func:`run_suite` is that loop
for ``inca-train`` (:func:`run_train_suite`, below), ``inca-probe`` and ``inca-compare``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .backbone import Backbone
from .distributed import SOLO, World, acting_as, launched
from .errors import InCAError, first_line
from .io import atomic_write_json, atomic_write_text, digest, directory_lock, read_json, remove_stale_temps
from .report import markdown_table
from .tasks import Task
from .train.runner import SOURCE_OPTIONS, InCAOptions, train_inca_task

__all__ = [
    "RESULTS_JSON",
    "RESULTS_MD",
    "Unit",
    "finished_on_same_data",
    "open_report",
    "render_results",
    "run_suite",
    "run_train_suite",
    "task_directory",
    "train_config",
]

_logger = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"

Report = dict[str, Any]


@dataclass(frozen=True)
class Unit:
    """One unit of a suite: ``key`` identifies its result in the report, ``name`` it in the log, and ``run``
    does the work and returns the result (called only when the report lacks it)."""

    key: str
    name: str
    run: Callable[[], Any]


def open_report(path: Path, fresh: Report, *, overwrite: bool = False) -> Report:
    """The report at ``path`` when it holds results of ``fresh["config"]`` (and ``fresh``'s ``format_version``),
    to be extended; ``fresh`` when there is none, or with ``overwrite``; else a one-line error."""
    if not path.is_file():
        return fresh
    try:
        saved = read_json(path)
    except (OSError, ValueError) as exc:
        problem = f"{path} is unreadable ({first_line(exc)})"
    else:
        problem = _mismatch(path, saved, fresh)
    if problem is None:
        return saved
    if not overwrite:
        raise InCAError(f"{problem}: use another --out, or --overwrite to replace them")
    _logger.warning("%s: replacing them (--overwrite)", problem)
    return fresh


def _mismatch(path: Path, saved: Any, fresh: Report) -> str | None:
    """Why a run starting from ``fresh`` cannot extend the ``saved`` report, or None."""
    if not isinstance(saved, dict) or saved.get("format_version") != fresh.get("format_version"):
        return f"{path} holds results of another inca version"
    config = json.loads(json.dumps(fresh["config"]))  # as it reads back from JSON: tuples become lists
    old = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    if old == config:
        return None
    differ = sorted(k for k in {*config, *old} if old.get(k) != config.get(k))
    return f"{path} holds results of another configuration (differs in {', '.join(differ)})"


def _in_tasks(report: Report, key: str) -> bool:
    return key in report["tasks"]


def _put_in_tasks(report: Report, key: str, result: Any) -> None:
    report["tasks"][key] = result


def run_suite(
    out: str | os.PathLike,
    report_file: str,
    fresh: Report,
    units: Iterable[Unit],
    write_reports: Callable[[Path, Report], object],
    *,
    overwrite: bool = False,
    finished: Callable[[Report, str], bool] = _in_tasks,
    store: Callable[[Report, str, Any], None] = _put_in_tasks,
) -> Report:
    """Run ``units`` in order into the report ``out/report_file`` (see :func:`open_report`), skipping those
    already ``finished`` there; after each unit its result is ``store``d, the report rewritten atomically and
    ``write_reports(out, report)`` renders the rest (Markdown, plots). By default results live in
    ``report["tasks"]`` under their unit's key. ``units`` is iterated lazily: it may load data as it goes.

    Under ``torchrun`` the ranks share the units (see :mod:`inca.distributed`): each claims the next unfinished
    one from the c10d store and writes its result to a file of its own; rank 0 merges them into the report. With
    fewer units than ranks, every rank runs each unit data-parallel instead. Each result records the ``rank``
    and ``world_size`` that produced it.
    """
    out = Path(out)
    path = out / report_file
    world = launched()
    if world.is_distributed:
        units = list(units)
        _require_same_suite(world, fresh, units)
    lock = directory_lock(out, "the output directory") if world.is_main else contextlib.nullcontext()
    with lock:
        report: Report | None = None
        target = path  # where the reports go while units run (see _open_target)

        def save(content: Report | None = None) -> None:
            """Write ``content`` (the report by default) and render the rest of the reports from it."""
            content = report if content is None else content
            atomic_write_json(target, content)
            write_reports(target.parent, content)

        if world.is_main:
            if removed := remove_stale_temps(out):
                _logger.info("removed %d temporary files an interrupted run left in %s", removed, out)
            report, target = _open_target(path, fresh, overwrite)
            if (out / UNITS_DIR).is_dir():
                _merge_unit_results(out, report, store, save)

        if not world.is_distributed:
            for unit in units:
                if finished(report, unit.key):
                    _logger.info("%s: finished in an earlier run, skipped (its result is in %s)", unit.name, path)
                    continue
                store(report, unit.key, _trained_by(unit.run(), world, data_parallel=False))
                save()
            save()
            _complete_replacement(path, target, report, write_reports)
            return report
        report = world.broadcast(report)
        units = list(units)
        keys = set(world.broadcast([unit.key for unit in units if not finished(report, unit.key)]))
        pending = [unit for unit in units if unit.key in keys]  # rank 0's list: every rank claims from the same
        if len(pending) < world.size:
            _logger.info("%d unit(s) for %d ranks: each runs data-parallel on every rank", len(pending), world.size)
            for unit in pending:
                result = _trained_by(unit.run(), world, data_parallel=True)
                if world.is_main:
                    store(report, unit.key, result)
                    save()
            if world.is_main:
                save()
        else:
            with acting_as(SOLO):
                for index in world.claimed(len(pending)):
                    unit = pending[index]
                    _logger.info("%s: claimed (%d of %d)", unit.name, index + 1, len(pending))
                    result = _trained_by(unit.run(), world, data_parallel=False)
                    atomic_write_json(_unit_file(out, unit.key), {"config": report["config"], "key": unit.key,
                                                                  "result": result})
                    if world.is_main:  # the reports grow as units finish, not only at the end
                        _write_interim(out, report, store, [unit.key for unit in pending], save)
            world.barrier()
            if world.is_main:
                _merge_unit_results(out, report, store, save, order=[unit.key for unit in pending])
                lost = [unit.name for unit in pending if not finished(report, unit.key)]
                if lost:
                    raise InCAError(f"no result reached {out / UNITS_DIR} for {', '.join(lost)} (is --out on a file "
                                    "system every rank shares?); rerun the same command to finish them")
        if world.is_main:
            _complete_replacement(path, target, report, write_reports)
        world.barrier()
    return report


REPLACING_DIR = ".inca-replacing"


def _open_target(path: Path, fresh: Report, overwrite: bool) -> tuple[Report, Path]:
    """The report to extend (see :func:`open_report`) and the file to write it to while units run.

    A run that replaces another configuration's report (``overwrite``) writes its reports to
    ``OUT/.inca-replacing/`` and moves them over the previous ones only once every unit has finished: what a user
    expects of ``--overwrite`` is a good result replaced by a complete one, never by a fragment, so the previous
    report stays as it is through a run that fails or is interrupted. A rerun of that configuration resumes the
    replacement from there."""
    pending = path.parent / REPLACING_DIR / path.name
    if pending.is_file():
        try:
            saved = read_json(pending)
        except (OSError, ValueError):
            saved = None
        if _mismatch(pending, saved, fresh) is None:
            _logger.info("resuming the replacement of %s: the new results stay in %s until every unit has finished",
                         path, pending.parent)
            return saved, pending
    report = open_report(path, fresh, overwrite=overwrite)
    if report is not fresh or not path.exists():
        return report, path
    if pending.parent.is_dir():
        shutil.rmtree(pending.parent)  # an abandoned replacement by yet another configuration
    _logger.info("%s keeps the previous results until every unit has finished; until then the new ones are in %s",
                 path, pending.parent)
    return report, pending


def _complete_replacement(
    path: Path, target: Path, report: Report, write_reports: Callable[[Path, Report], object]
) -> None:
    """Once every unit has finished, the reports of a replacing run (see :func:`_open_target`) take the place of
    the previous ones."""
    if target == path:
        return
    atomic_write_json(path, report)
    write_reports(path.parent, report)
    shutil.rmtree(target.parent)
    _logger.info("%s now holds the new results; the previous ones are replaced", path)


def _require_same_suite(world: World, fresh: Report, units: list[Unit]) -> None:
    """Under ``torchrun`` every rank must run the same suite: ranks started with other flags (say, another --lr)
    would otherwise train under settings the report does not record. Each rank's configuration and unit keys are
    compared with rank 0's before any work starts, and every rank refuses in one line if one differs."""
    mine = {"config": json.loads(json.dumps(fresh["config"])), "units": [unit.key for unit in units]}
    everyone = world.gather(mine)
    reference = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs != reference:
            old, new = reference["config"], theirs["config"]
            differ = sorted(k for k in {*old, *new} if old.get(k) != new.get(k)) or ["the tasks"]
            raise InCAError(f"rank {rank} was started with another configuration than rank 0 (differs in "
                            f"{', '.join(differ)}): start every rank with the same command")


UNITS_DIR = ".inca-units"


def _unit_file(out: Path, key: str) -> Path:
    """Where a rank leaves the result of a unit it ran (merged into the report by rank 0)."""
    return out / UNITS_DIR / f"{digest(key)}.json"


def _unit_results(out: Path, config: Any) -> tuple[list[Path], dict[str, Any]]:
    """The unit result files ranks left in ``out`` and, by unit key, the results of ``config`` among them."""
    files = sorted((out / UNITS_DIR).glob("*.json")) if (out / UNITS_DIR).is_dir() else []
    found = {}
    for file in files:
        try:
            saved = read_json(file)
        except (OSError, ValueError):
            saved = None  # a result its rank never finished writing cannot exist (atomic writes): skip junk
        if isinstance(saved, dict) and saved.get("config") == json.loads(json.dumps(config)):
            if _written_by_a_rank(file, saved):
                found[saved["key"]] = saved["result"]
            else:
                _logger.warning("%s is not a unit result a rank wrote (no key naming the file, or no result): "
                                "skipped", file)
    return files, found


def _written_by_a_rank(file: Path, saved: dict[str, Any]) -> bool:
    """Whether ``saved`` has what a rank writes to ``file``: its unit's key, whose digest names the file, and the
    unit's result (a dict, as every suite's units return)."""
    key = saved.get("key")
    return isinstance(key, str) and file.name == f"{digest(key)}.json" and isinstance(saved.get("result"), dict)


def _merge_unit_results(
    out: Path, report: Report, store: Callable[[Report, str, Any], None], save: Callable[[], None],
    order: list[str] | None = None,
) -> None:
    """Move the unit results ranks left in ``out`` (of this configuration) into ``report``: those of ``order``
    in that order, then any other (left by an interrupted run); results of another configuration are dropped."""
    files, found = _unit_results(out, report["config"])
    order = order or []
    keys = [key for key in order if key in found] + [key for key in found if key not in order]
    for key in keys:
        store(report, key, found[key])
    if keys:
        _logger.info("merged %d result(s) that ranks left in %s", len(keys), out / UNITS_DIR)
    save()  # the report holds them before their files go
    for file in files:
        file.unlink(missing_ok=True)


def _write_interim(
    out: Path, report: Report, store: Callable[[Report, str, Any], None], order: list[str],
    save: Callable[[Report], None],
) -> None:
    """The reports as they stand while ranks still work: ``report`` plus every unit result that has arrived, in
    unit order (the files stay until the final merge, so a report left by a killed run loses nothing)."""
    interim = copy.deepcopy(report)
    _, found = _unit_results(out, report["config"])
    for key in order:
        if key in found:
            store(interim, key, found[key])
    save(interim)


def _trained_by(result: Any, world: World, *, data_parallel: bool) -> Any:
    """``result`` (a dict) with the rank and world size of the process(es) that produced it."""
    if not isinstance(result, dict):
        return result
    return {**result, "rank": world.rank, "world_size": world.size, "data_parallel": data_parallel}


# ----------------------------------------------------------------------------------------------------
# inca-train: one InCA bank per task
# ----------------------------------------------------------------------------------------------------


def train_config(backbone: Backbone, layers_spec: str, options: InCAOptions) -> dict[str, Any]:
    """What must match for a finished task's results to be reused by a rerun (not where activations come from)."""
    keep = {k: v for k, v in asdict(options).items() if k not in SOURCE_OPTIONS}
    return {"backbone": backbone.fingerprint, "layers": str(layers_spec), **keep}


def run_train_suite(
    backbone: Backbone,
    task_specs: Iterable[str],
    layers_for: Callable[[Task], list[int]],
    layers_spec: str,
    options: InCAOptions,
    out: str | os.PathLike,
    load_task: Callable[[str], Task],
    overwrite: bool = False,
) -> Report:
    """:func:`~inca.train.runner.train_inca_task` on each task into ``out/<task>/``; ``results.json`` and
    ``results.md`` after each task (a rerun with the same configuration skips the finished ones)."""
    out = Path(out)
    tasks = {spec: load_task(spec) for spec in task_specs}  # every spec loads before any training starts

    def train(task: Task) -> dict[str, Any]:
        result = train_inca_task(backbone, task, layers_for(task), options, out / task_directory(task))
        _logger.info("%s: best layer %d, val %.4f, test %.4f (%.1fs)", task.spec, result["best"]["layer"],
                     result["val_acc"], result["test_acc"], result["seconds"])
        return {**result, "fingerprint": task.fingerprint, "skipped_images": task.identity.get("skipped_images", 0)}

    fresh = {"backbone": backbone.describe(), "config": train_config(backbone, layers_spec, options), "tasks": {}}
    units = (Unit(spec, spec, functools.partial(train, task)) for spec, task in tasks.items())
    return run_suite(out, RESULTS_JSON, fresh, units, _write_markdown, overwrite=overwrite,
                     finished=finished_on_same_data(tasks, "trained"))


def finished_on_same_data(tasks: dict[str, Task], done: str) -> Callable[[Report, str], bool]:
    """A suite's ``finished`` test for results by task spec: a task counts as finished only if its data is the
    same as when it was ``done`` (its result records the task's fingerprint), else it runs again."""

    def finished(report: Report, spec: str) -> bool:
        result = report["tasks"].get(spec)
        if result is not None and result.get("fingerprint") != tasks[spec].fingerprint:
            _logger.warning("%s: its data changed since it was %s; running it again", spec, done)
            return False
        return result is not None

    return finished


def task_directory(task: Task) -> str:
    """A task's output directory name: readable, and unique by construction (specs that slug alike, or a
    task whose data changed, get different directories)."""
    return f"{task.slug}-{task.fingerprint[:8]}"


def _write_markdown(out: Path, results: Report) -> None:
    atomic_write_text(out / RESULTS_MD, render_results(results))


def render_results(results: Report) -> str:
    """The summary table (best adapter per task) then, per task, every adapter of its bank."""
    backbone = results["backbone"]
    lines = [f"# InCA results: {backbone['name']} ({backbone['weights']} weights)\n"]
    headers = ["task", "best layer", "lr", "queries", "val acc", "test acc", "params", "% backbone", "adapters",
               "activations", "seconds"]
    rows = [
        [spec, r["best"]["layer"], r["best"]["lr"], r["best"]["num_queries"], r["val_acc"], r["test_acc"],
         r["trainable_params"], f"{r['trainable_percent']:.2f}%", len(r["adapters"]), r["activations"],
         f"{r['seconds']:.1f}"]
        for spec, r in results["tasks"].items()
    ]
    if any(r.get("ensemble") for r in results["tasks"].values()):
        headers[6:6] = ["ensemble", "ens. val acc", "ens. test acc"]
        for row, r in zip(rows, results["tasks"].values()):
            ensemble = r.get("ensemble") or {}
            row[6:6] = [f"top {ensemble['k']}" if ensemble else "-", ensemble.get("val_acc"), ensemble.get("test_acc")]
    lines.append(markdown_table(headers, rows))
    for spec, r in results["tasks"].items():
        lines.append(f"## {spec}\n")
        lines.append(markdown_table(
            ["layer", "lr", "wd", "queries", "heads", "mlp", "seed", "val acc", "test acc", "diverged"],
            [[a["layer"], a["lr"], a["weight_decay"], a["num_queries"], a["num_heads"], a["mlp_ratio"], a["seed"],
              a["val_acc"], a["test_acc"], "yes" if a["diverged"] else ""] for a in r["adapters"]],
        ))
    return "\n".join(lines)
