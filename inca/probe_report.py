"""An ``inca-probe`` report as ``inca-train --layers best:K`` reads it, checked before any work starts.

This module imports no torch, so a report that lacks a task of ``--tasks`` is one line within a second of the
command's start, not an error after the earlier tasks have trained. Its tasks are keyed by their canonical
spec (:func:`inca.tasks.canonical_task_spec`), so a task probed as ``folder:../data/faces`` is found when
trained as ``folder:/home/me/data/faces``, and so is a report written before specs were canonical.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InCAError
from .io import read_json_file
from .tasks import canonical_task_spec

__all__ = ["ProbeReport", "check_probe_report", "read_probe_report"]

_FIX = "pass the probe.json that inca-probe wrote"


@dataclass(frozen=True)
class ProbeReport:
    """An ``inca-probe`` report read once, passed on from the start-up check to the layers' choice: its content
    (as :func:`read_probe_report` gives it) and its path, which messages name (``str()``)."""

    path: str
    content: dict[str, Any]

    def __str__(self) -> str:
        return self.path


def read_probe_report(report: str | os.PathLike | ProbeReport) -> dict[str, Any]:
    """The content of the ``inca-probe`` report ``report``, its ``tasks`` keyed by canonical spec (a
    :class:`ProbeReport`'s, already read, as it is); a file that is not one (missing, not JSON, no tasks) is
    refused in one line."""
    if isinstance(report, ProbeReport):
        return report.content
    if not Path(report).is_file():
        raise InCAError(f"probe report {report} does not exist; run inca-probe first")
    content = read_json_file(report, _FIX, what="probe report")
    tasks = content.get("tasks") if isinstance(content, dict) else None
    if not isinstance(tasks, dict):
        raise InCAError(f"probe report {report} is not an inca-probe report (no tasks in it): {_FIX}")
    return {**content, "tasks": {_canonical(spec): result for spec, result in tasks.items()}}


def _canonical(spec: str) -> str:
    try:
        return canonical_task_spec(spec)
    except InCAError:  # a task source no longer installed: its spec can only match itself
        return spec


def check_probe_report(
    report: str | os.PathLike | ProbeReport, specs: Sequence[str], num_blocks: int | None = None
) -> ProbeReport:
    """``report`` (read unless it is a :class:`ProbeReport`), checked: every task of ``specs`` is in it (one line
    naming the first missing task and the report), and, given the backbone's ``num_blocks``, it probed a backbone of
    as many blocks (its layer indices mean the same blocks)."""
    if not isinstance(report, ProbeReport):
        report = ProbeReport(str(report), read_probe_report(report))
    content = report.content
    tasks = content["tasks"]
    missing = [spec for spec in specs if canonical_task_spec(spec) not in tasks]
    if missing:
        more = f" (and {len(missing) - 1} more task(s) of --tasks)" if len(missing) > 1 else ""
        raise InCAError(f"probe report {report} has no task {missing[0]}{more}; it has {', '.join(tasks) or 'none'}: "
                        f"probe it first (inca-probe --tasks {','.join(missing)}) or leave it out of --tasks")
    probed = content.get("backbone", {}).get("num_blocks") if isinstance(content.get("backbone"), dict) else None
    if num_blocks is not None and isinstance(probed, int) and probed != num_blocks:
        name = content["backbone"].get("name", "another backbone")
        raise InCAError(f"probe report {report} ranks the layers of {name} ({probed} blocks), but this backbone has "
                        f"{num_blocks} blocks: probe this backbone with inca-probe, or pass its --backbone and "
                        "--model-kwargs")
    return report
