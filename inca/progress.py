"""Progress of long loops: a tqdm bar on a terminal, a log line every tenth of the way when output is
redirected (a log file gets ~10 lines, not hundreds of bar redraws), nothing with ``--quiet``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress", "set_quiet"]

logger = logging.getLogger(__name__)
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence every progress report of this process (``--quiet``)."""
    global _quiet
    _quiet = quiet


class _LogProgress:
    """The part of tqdm's interface inca uses, reporting through logging at each tenth of ``total``."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = initial
        self.postfix = ""
        self._reported = self._tenth()

    def _tenth(self) -> int:
        return 10 * self.n // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self._tenth() > self._reported:
            self._reported = self._tenth()
            extra = f", {self.postfix}" if self.postfix else ""
            logger.info("%s: %d%% (%d/%d %s%s)", self.desc, 10 * self._reported, self.n, self.total, self.unit, extra)

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
