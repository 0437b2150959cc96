"""Registries: the one way inca is extended, by its own modules and by other packages.

Methods (``inca-compare``), task sources (``--tasks PREFIX:...``) and probes (``inca-probe``) are each a
:class:`Registry`. A built-in registers itself when its module is imported (one registration call at the end
of the module); another package registers its own through a Python entry point in the registry's group, so
every command sees it without editing inca::

    # the other package's pyproject.toml
    [project.entry-points."inca.task_sources"]
    noise = "my_package.noise"        # a module whose import calls inca.tasks.register_task_source(...)

The entry point names a module (or an object in it); loading it imports the module, whose registration call
does the rest. Registries load their built-ins and entry points on first use, so importing inca stays cheap.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from .errors import InCAError, first_line

__all__ = ["Registry", "lazy", "unknown_name"]

logger = logging.getLogger(__name__)

Entry = TypeVar("Entry")


def lazy(target: str) -> Callable[..., Any]:
    """A function named ``"module:attribute"``, imported on its first call: a registration can name torch code
    without importing torch (``--help`` lists every extension without loading any)."""
    module_name, _, attribute = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module_name), attribute)(*args, **kwargs)

    call.__name__ = call.__qualname__ = attribute
    call.__doc__ = f"{target}, imported on first call"
    return call


def unknown_name(
    kind: str, name: str, valid: Sequence[str], *, wording: str | None = None, options: str | None = None,
    matches: int = 1,
) -> InCAError:  # fmt: skip
    """The one-line error for an unknown ``name`` of a ``kind``, with its closest valid names (up to ``matches``):
    ``{wording} (did you mean X?); {options}``. By default ``wording`` is ``unknown KIND 'NAME'`` and ``options``
    lists every valid name (``choose from A, B``); a caller replaces either where it says more (the spec forms of
    a task, a config's keys)."""
    close = difflib.get_close_matches(name, valid, n=matches)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    wording = f"unknown {kind} {name!r}" if wording is None else wording
    options = f"choose from {', '.join(valid)}" if options is None else options
    return InCAError(f"{wording}{hint}; {options}")


class Registry(Mapping[str, Entry], Generic[Entry]):
    """Named entries of one ``kind`` in registration order: ``builtins`` (modules that register on import) first,
    then those of the installed packages' entry points in ``group``."""

    def __init__(self, kind: str, group: str, builtins: Sequence[str] = ()) -> None:
        self.kind, self.group = kind, group
        self._builtins = tuple(builtins)
        self._entries: dict[str, Entry] = {}
        self._rank: dict[str, int] = {}  # the registering built-in's place in ``builtins``; others after them
        self._loaded = False

    def register(self, name: str, entry: Entry) -> Entry:
        """Add ``entry`` under ``name`` (a name registered twice is a programming error: ValueError)."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        self._rank[name] = self._registering_builtin()
        # Built-ins first, in their listed order, whichever module a program happened to import first.
        self._entries = dict(sorted(self._entries.items(), key=lambda item: self._rank[item[0]]))
        return entry

    def _registering_builtin(self) -> int:
        """The place in ``builtins`` of the module whose import is registering now (len(builtins) if none)."""
        frame = inspect.currentframe()
        while frame is not None:
            module = frame.f_globals.get("__name__")
            if module in self._builtins:
                return self._builtins.index(module)
            frame = frame.f_back
        return len(self._builtins)

    def pop(self, name: str, *default: Entry) -> Entry:
        """Remove and return the entry ``name`` (as :meth:`dict.pop`): for a test's or a session's own entry."""
        self._rank.pop(name, None)
        return self._entries.pop(name, *default)

    def load(self) -> None:
        """Import the built-ins, then every entry point of the group (once; a broken plugin is one line)."""
        if self._loaded:
            return
        self._loaded = True  # first: a built-in's import calls register(), which must not recurse here
        for module in self._builtins:
            importlib.import_module(module)
        for point in sorted(entry_points(group=self.group), key=lambda p: p.name):
            try:
                point.load()
            except Exception as exc:  # a third-party import can fail any way: name the plugin, not a traceback
                raise InCAError(f"{self.kind} plugin {point.name!r} ({point.value}, entry point group "
                                f"{self.group!r}) failed to load: {first_line(exc)}; fix or uninstall it") from exc
            logger.debug("loaded %s plugin %s from %s", self.kind, point.name, point.value)

    def get_entry(self, name: str) -> Entry:
        """The entry ``name``; an unknown name is a one-line :class:`InCAError` naming the closest one."""
        self.load()
        if name not in self._entries:
            raise unknown_name(self.kind, name, list(self._entries))
        return self._entries[name]

    def __getitem__(self, name: str) -> Entry:
        self.load()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(self._entries)

    def __len__(self) -> int:
        self.load()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, group={self.group!r}, entries={list(self._entries)})"
