"""Progress of long loops: a tqdm bar on a terminal, a log line every tenth of the way when output is
redirected (a log file gets ~10 lines, not hundreds of bar redraws), nothing with ``--quiet``.

A command made of units (a suite's tasks or (task, method) pairs) declares them with :func:`command_units`; its
loops then report in a redirected log only when the whole command passes a tenth, at most ten lines whatever the
number of units and loops. A unit's loops run one after another and their number is not known in advance (a store
built, then the bank trained): the first covers the first half of the unit, the next half of what is left, and so
on, so that a later loop, often the longest, still gets lines of its own.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["command_units", "progress", "set_quiet", "unit_done"]

logger = logging.getLogger(__name__)
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence every progress report of this process (``--quiet``)."""
    global _quiet
    _quiet = quiet


class _Units:
    """A command's whole work: ``total`` units, ``done`` of them finished, ``reported`` tenths logged, and how many
    loops (``stages``) the running unit has started."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.reported, self.stages = max(total, 1), 0, 0, 0

    def tenth(self, stage: int, fraction: float) -> int:
        """The tenth of the command reached with loop ``stage`` of the running unit ``fraction`` through it: loop k
        covers the unit's share from 1 - 2**-k to 1 - 2**-(k + 1)."""
        within = 1 - 2.0**-stage + min(fraction, 1.0) * 2.0 ** -(stage + 1)
        return min(10, int(10 * (min(self.done, self.total) + within) / self.total))


_units: _Units | None = None


@contextlib.contextmanager
def command_units(total: int) -> Iterator[None]:
    """Within it, progress lines count tenths of ``total`` units of work (each ended by :func:`unit_done`) rather
    than of each loop. A command inside another's units (a suite's unit calling a suite) counts as its unit."""
    global _units
    if _units is not None:
        yield
        return
    _units = _Units(total)
    try:
        yield
    finally:
        _units = None


def unit_done() -> None:
    """One unit of the running command is finished (run or skipped)."""
    if _units is not None:
        units_reached(_units.done + 1)


def units_reached(done: int) -> None:
    """The running command's next unit follows ``done`` finished ones: under work sharing a rank's next unit is
    its claim's place in the whole command, not a count of the units that rank ran itself."""
    if _units is not None:
        _units.done, _units.stages = done, 0


class _LogProgress:
    """The part of tqdm's interface inca uses, reporting through logging at each tenth of ``total``."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = initial
        self.postfix = ""
        self._reported = self._tenth()
        self._stage = 0
        if _units is not None:  # the next loop of the running unit
            self._stage, _units.stages = _units.stages, _units.stages + 1

    def _tenth(self) -> int:
        return 10 * self.n // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total:
            return
        if _units is not None:  # one line per tenth of the whole command
            tenth = _units.tenth(self._stage, self.n / self.total)
            if tenth > _units.reported:
                _units.reported = tenth
                self._log(f"; unit {min(_units.done + 1, _units.total)} of {_units.total}")
        elif self._tenth() > self._reported:
            self._reported = self._tenth()
            self._log("")

    def _log(self, where: str) -> None:
        extra = f", {self.postfix}" if self.postfix else ""
        logger.info("%s: %d%% (%d/%d %s%s%s)", self.desc, 100 * self.n // self.total, self.n, self.total, self.unit,
                    extra, where)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update()

    def close(self) -> None:
        pass

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
    initial: int = 0, enabled: bool = True,
) -> tqdm | _LogProgress:
    """A progress report for a loop of ``total`` steps (or over ``iterable``): use it like a tqdm bar."""
    if _quiet or not enabled:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=False)
    return _LogProgress(iterable, total, desc, unit, initial)
