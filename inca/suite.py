"""Suites: units of work (tasks, or (task, method) pairs) run one after another on one loaded backbone.

After each unit the suite's report is rewritten atomically, so an interrupted suite loses at most the unit that
was running, and a rerun into the same directory with the same configuration skips every finished unit. A report
of another configuration is never silently replaced: that takes ``overwrite``. :func:`run_suite` is that loop
for ``inca-train`` (:mod:`inca.training`), ``inca-probe`` and ``inca-compare``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed import SOLO, World, acting_as, launched
from .errors import InCAError
from .io import atomic_write_json, digest, directory_lock, read_json, read_json_file, remove_stale_temps
from .progress import unit_done, units_reached
from .tasks import Task, canonical_task_spec

__all__ = ["REPLACING_DIR", "UNITS_DIR", "Report", "Unit", "finished_on_same_data", "open_report", "run_suite",
           "spelling_of", "task_directory"]

logger = logging.getLogger(__name__)

UNITS_DIR = ".inca-units"  # under a suite's output directory: results ranks left for rank 0 to merge
REPLACING_DIR = ".inca-replacing"  # under it: the reports of an --overwrite run until every unit has finished

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
        saved = read_json_file(path)
    except InCAError as exc:
        problem = str(exc)
    else:
        problem = _mismatch(path, saved, fresh)
    if problem is None:
        return saved
    if not overwrite:
        raise InCAError(f"{problem}: use another --out, or --overwrite to replace them")
    logger.warning("%s: replacing them (--overwrite)", problem)
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


def finished_on_same_data(tasks: dict[str, Task], done: str) -> Callable[[Report, str], bool]:
    """A suite's ``finished`` test for results by task spec: a task counts as finished only if its data is the
    same as when it was ``done`` (its result records the task's fingerprint), else it runs again."""

    def finished(report: Report, spec: str) -> bool:
        result = report["tasks"].get(spec)
        if result is not None and result.get("fingerprint") != tasks[spec].fingerprint:
            logger.warning("%s: its data changed since it was %s; running it again", tasks[spec].name, done)
            return False
        return result is not None

    return finished


def _in_tasks(report: Report, key: str) -> bool:
    return key in report["tasks"]


def _put_in_tasks(report: Report, key: str, result: Any) -> None:
    """``result`` under the task spec ``key``, replacing the task's entry under another spelling of its spec:
    reports of inca before canonical specs keyed a folder by its path as typed (``folder:../data/faces``), in a
    directory named after it; that task runs again under its canonical spec and the entry is replaced."""
    for old in [spec for spec in report["tasks"] if spec != key and spelling_of(spec, key)]:
        logger.warning("%s: its earlier result, recorded as %s by an inca version that named tasks by the path as "
                       "typed, is replaced; that run's files are left where they are", key, old)
        del report["tasks"][old]
    report["tasks"][key] = result


def spelling_of(spec: str, canonical: str) -> bool:
    """Whether ``spec`` (as a report recorded it) names the task whose canonical spec is ``canonical``."""
    try:
        return canonical_task_spec(spec) == canonical
    except InCAError:  # a spec of a task source no longer installed
        return False


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
    world = launched()
    if world.is_distributed:
        units = list(units)
        _require_same_suite(world, fresh, units)
    suite = _SuiteRun(out, out / report_file, write_reports, finished, store, world)
    with directory_lock(out, "the output directory") if world.is_main else contextlib.nullcontext():
        if world.is_main:
            suite.open(fresh, overwrite)
        if not world.is_distributed:
            suite.run_in_order(units)
            suite.complete_replacement(out / report_file)
            return suite.report
        suite.report = world.broadcast(suite.report)
        pending = suite.pending(units)
        finished_before = len(units) - len(pending)
        units_reached(finished_before)  # finished in an earlier run: done, as run_in_order counts them
        if len(pending) < world.size:
            suite.run_data_parallel(pending)
        else:
            suite.share(pending, finished_before)
        world.barrier()
        if world.is_main:
            suite.complete_replacement(out / report_file)
    return suite.report


def task_directory(task: Task) -> str:
    """A task's output directory name in any suite: short and readable (a folder's own name: ``faces-ea1094d6``),
    the same however its spec was spelled, and unique by construction (two folders of one name, tasks that slug
    alike, or a task whose data changed, get different directories: the fingerprint differs)."""
    return f"{task.slug}-{task.fingerprint[:8]}"


@dataclass(eq=False)
class _SuiteRun:
    """One run of a suite into ``out``: the report as it stands (rank 0's; other ranks hold a copy to decide
    what is pending) and how results get into it and onto disk. ``path`` is where the report is written while
    units run: ``out/report_file``, or under ``out/.inca-replacing/`` while an ``--overwrite`` run replaces
    another configuration's report (see :meth:`open`)."""

    out: Path
    path: Path
    write_reports: Callable[[Path, Report], object]
    finished: Callable[[Report, str], bool]
    store: Callable[[Report, str, Any], None]
    world: World
    report: Report | None = None

    def save(self, content: Report | None = None) -> None:
        """Write ``content`` (the report by default) and render the rest of the reports from it."""
        content = self.report if content is None else content
        atomic_write_json(self.path, content)
        self.write_reports(self.path.parent, content)

    def open(self, fresh: Report, overwrite: bool) -> None:
        """Rank 0: the report to extend (:func:`open_report`), with the results an interrupted run's ranks left.

        A run that replaces another configuration's report (``overwrite``) writes its reports to
        ``OUT/.inca-replacing/`` and moves them over the previous ones only once every unit has finished
        (:meth:`complete_replacement`): what a user expects of ``--overwrite`` is a good result replaced by a
        complete one, never by a fragment, so the previous report stays as it is through a run that fails or is
        interrupted. A rerun of that configuration resumes the replacement from there."""
        if removed := remove_stale_temps(self.out):
            logger.info("removed %d temporary files an interrupted run left in %s", removed, self.out)
        self.report, self.path = self._target(fresh, overwrite)
        if (self.out / UNITS_DIR).is_dir():
            self.merge()

    def _target(self, fresh: Report, overwrite: bool) -> tuple[Report, Path]:
        replacing = self.out / REPLACING_DIR / self.path.name
        if replacing.is_file():
            try:
                saved = read_json(replacing)
            except (OSError, ValueError):
                saved = None
            if _mismatch(replacing, saved, fresh) is None:
                logger.info("resuming the replacement of %s: the new results stay in %s until every unit has "
                            "finished", self.path, replacing.parent)
                return saved, replacing
        report = open_report(self.path, fresh, overwrite=overwrite)
        if report is not fresh or not self.path.exists():
            return report, self.path
        if replacing.parent.is_dir():
            shutil.rmtree(replacing.parent)  # an abandoned replacement by yet another configuration
        logger.info("%s keeps the previous results until every unit has finished; until then the new ones are in "
                    "%s", self.path, replacing.parent)
        return report, replacing

    def complete_replacement(self, final: Path) -> None:
        """Rank 0, every unit finished: the reports of a replacing run take the place of the previous ones."""
        if self.path == final:
            return
        replacing, self.path = self.path, final
        self.save()
        shutil.rmtree(replacing.parent)
        logger.info("%s now holds the new results; the previous ones are replaced", final)

    def run_unit(self, unit: Unit, *, data_parallel: bool) -> Any:
        return _trained_by(unit.run(), self.world, data_parallel=data_parallel)

    def keep(self, unit: Unit, result: Any) -> None:
        """Put ``result`` into the report and rewrite the reports."""
        self.store(self.report, unit.key, result)
        self.save()

    def run_in_order(self, units: Iterable[Unit]) -> None:
        """One process: every unfinished unit in turn, the reports rewritten after each."""
        for unit in units:
            if self.finished(self.report, unit.key):
                logger.info("%s: finished in an earlier run, skipped (its result is in %s)", unit.name, self.path)
            else:
                self.keep(unit, self.run_unit(unit, data_parallel=False))
            unit_done()
        self.save()

    def pending(self, units: list[Unit]) -> list[Unit]:
        """The units rank 0's report lacks, the same list on every rank (each claims from it)."""
        keys = set(self.world.broadcast([unit.key for unit in units if not self.finished(self.report, unit.key)]))
        return [unit for unit in units if unit.key in keys]

    def run_data_parallel(self, pending: list[Unit]) -> None:
        """Fewer units than ranks: every rank runs each unit on its shard of every batch; rank 0 keeps results."""
        logger.info("%d unit(s) for %d ranks: each runs data-parallel on every rank", len(pending), self.world.size)
        for unit in pending:
            result = self.run_unit(unit, data_parallel=True)
            if self.world.is_main:
                self.keep(unit, result)
            unit_done()
        if self.world.is_main:
            self.save()

    def share(self, pending: list[Unit], finished_before: int = 0) -> None:
        """Work sharing: each rank claims units alone and leaves their results in files; rank 0 rewrites the
        reports with every result that has arrived after each unit it finishes, and merges them at the end.
        A rank's progress lines place each claimed unit in the whole command (after ``finished_before``)."""
        order = [unit.key for unit in pending]
        with acting_as(SOLO):
            for index in self.world.claimed(len(pending)):
                unit = pending[index]
                units_reached(finished_before + index)
                logger.info("%s: claimed (%d of %d)", unit.name, index + 1, len(pending))
                result = self.run_unit(unit, data_parallel=False)
                atomic_write_json(self.unit_file(unit.key),
                                  {"config": self.report["config"], "key": unit.key, "result": result})
                if self.world.is_main:  # the reports grow as units finish, not only at the end
                    self.write_interim(order)
        self.world.barrier()
        if self.world.is_main:
            self.merge(order)
            lost = [unit.name for unit in pending if not self.finished(self.report, unit.key)]
            if lost:
                raise InCAError(f"no result reached {self.out / UNITS_DIR} for {', '.join(lost)} (is --out on a file "
                                "system every rank shares?); rerun the same command to finish them")

    def unit_file(self, key: str) -> Path:
        """Where a rank leaves the result of a unit it ran (merged into the report by rank 0)."""
        return self.out / UNITS_DIR / f"{digest(key)}.json"

    def left_results(self) -> tuple[list[Path], dict[str, Any]]:
        """The unit result files ranks left in ``out`` and, by unit key, the results of this configuration."""
        directory = self.out / UNITS_DIR
        files = sorted(directory.glob("*.json")) if directory.is_dir() else []
        config = json.loads(json.dumps(self.report["config"]))
        found = {}
        for file in files:
            try:
                saved = read_json(file)
            except (OSError, ValueError):
                saved = None  # a result its rank never finished writing cannot exist (atomic writes): skip junk
            if isinstance(saved, dict) and saved.get("config") == config:
                if _written_by_a_rank(file, saved):
                    found[saved["key"]] = saved["result"]
                else:
                    logger.warning("%s is not a unit result a rank wrote (no key naming the file, or no result): "
                                   "skipped", file)
        return files, found

    def write_interim(self, order: Sequence[str]) -> None:
        """The reports as they stand while ranks still work: the report plus every unit result that has arrived,
        in unit order (the files stay until the final merge, so a report left by a killed run loses nothing)."""
        interim = copy.deepcopy(self.report)
        _, found = self.left_results()
        for key in order:
            if key in found:
                self.store(interim, key, found[key])
        self.save(interim)

    def merge(self, order: Sequence[str] = ()) -> None:
        """Move the unit results ranks left in ``out`` (of this configuration) into the report: those of ``order``
        in that order, then any other (left by an interrupted run); results of another configuration are dropped."""
        files, found = self.left_results()
        keys = [key for key in order if key in found] + [key for key in found if key not in order]
        for key in keys:
            self.store(self.report, key, found[key])
        if keys:
            logger.info("merged %d result(s) that ranks left in %s", len(keys), self.out / UNITS_DIR)
        self.save()  # the report holds them before their files go
        for file in files:
            file.unlink(missing_ok=True)


def _written_by_a_rank(file: Path, saved: dict[str, Any]) -> bool:
    """Whether ``saved`` has what a rank writes to ``file``: its unit's key, whose digest names the file, and the
    unit's result (a dict, as every suite's units return)."""
    key = saved.get("key")
    return isinstance(key, str) and file.name == f"{digest(key)}.json" and isinstance(saved.get("result"), dict)


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


def _trained_by(result: Any, world: World, *, data_parallel: bool) -> Any:
    """``result`` (a dict) with the rank and world size of the process(es) that produced it."""
    if not isinstance(result, dict):
        return result
    return {**result, "rank": world.rank, "world_size": world.size, "data_parallel": data_parallel}
