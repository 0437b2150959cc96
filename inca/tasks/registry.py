"""The registry of task sources: one :func:`register_task_source` call per source module.

A task source turns the specs it claims into a :class:`~inca.tasks.base.Task`. It claims either a prefix
(``hf:`` claims ``hf:NAME``) or exact names (``digits``; ``synth-shapes``, ``synth-count``, ...), and gives

* ``load(spec, argument, settings) -> Task``: ``argument`` is what follows the prefix (or the exact name);
  ``settings`` are the shared loading settings (:class:`TaskLoadConfig`), or the source's own subclass of
  them when it declares settings of its own;
* optionally ``check(spec, argument, settings)``: cheap checks (a folder exists and has the layout, a dataset
  name is known) that run for every spec before torch, a backbone or any task is loaded, so a typo costs
  nothing; they import no torch. :func:`load_task` runs them again before ``load``, unless the source says its
  load makes them itself (``check_on_load=False``: a folder's load lists its folders once);
* optionally ``canonical(argument) -> argument``: the one spelling of what ``argument`` names (a folder's
  resolved absolute path), so that every spelling of a spec is one task (one fingerprint, store and output).

:func:`check_task_spec`, :func:`load_task`, the spec forms of ``--help`` and of error messages, and the flags
of a source's own settings (``--{source}-{setting}``) all come from :data:`TASK_SOURCES`: the built-in sources
below, then those other packages register through the ``inca.task_sources`` entry-point group. Source
modules import their heavy libraries (torchvision, ``datasets``) inside functions, so building a command's
parser imports no torch.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inca import options as opt
from inca.config import ArgumentContainer, Config, add_config_flags, config_from_args, hparam
from inca.errors import InCAError
from inca.registry import Registry, unknown_name

if TYPE_CHECKING:
    from inca.tasks.base import Task

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_SOURCES",
    "TASK_SOURCES",
    "TaskLoadConfig",
    "TaskSource",
    "add_task_source_flags",
    "canonical_task_spec",
    "check_task_spec",
    "check_task_specs",
    "find_task_source",
    "load_task",
    "parse_task_list",
    "register_task_source",
    "task_settings",
    "task_sources_help",
    "task_spec_forms",
]


@dataclass(frozen=True, kw_only=True)
class TaskLoadConfig(Config):
    """The loading settings every task source receives (a source with settings of its own subclasses it)."""

    data_root: str | None = hparam(
        None, help="root directory for tv:NAME datasets",
        source="inca's own choice: datasets are read where the user keeps them, never from a guessed place",
    )  # fmt: skip
    download: bool = hparam(
        False, help="allow torchvision to download tv: datasets",
        source="inca's own choice: nothing is fetched unless asked, so runs work offline and read known files",
    )  # fmt: skip
    split_seed: int = hparam(
        0, help="seed of the val/test carving", check=opt.seed,
        source="inca's own choice: a fixed carving, so every run of a task sees the same splits",
    )  # fmt: skip
    skip_bad_images: bool = hparam(
        False, help="drop unreadable image files of folder: tasks (counted in the results) instead of stopping",
        source="inca's own choice: a damaged file stops the run unless the user accepts training without it",
    )  # fmt: skip


SHARED_SETTINGS = tuple(TaskLoadConfig.fields())

LoadFn = Callable[[str, str, TaskLoadConfig], "Task"]
CheckFn = Callable[[str, str, TaskLoadConfig], None]
CanonicalFn = Callable[[str], str]


@dataclass(frozen=True)
class TaskSource:
    """One registered task source (see the module docstring for ``load`` and ``check``).

    ``prefix`` (``"hf:"``) or ``names`` (exact specs) say which specs it claims; ``spec_form``
    (``"hf:NAME[:CONFIG]"``) is how ``--help`` and error messages show them; ``config`` is the settings class
    its loader receives: :class:`TaskLoadConfig`, or a subclass adding the source's own settings, which become
    ``--{name}-{setting}`` flags.
    """

    name: str
    prefix: str | None
    names: tuple[str, ...]
    load: LoadFn
    spec_form: str
    summary: str
    check: CheckFn | None = None
    config: type[TaskLoadConfig] = TaskLoadConfig
    canonical: CanonicalFn | None = None
    check_on_load: bool = True

    def argument(self, spec: str) -> str | None:
        """What ``spec`` names for this source (the text after its prefix, or the exact name); None when the
        source does not claim ``spec`` (a prefix with nothing after it claims nothing)."""
        if spec in self.names:
            return spec
        if self.prefix and spec.startswith(self.prefix) and len(spec) > len(self.prefix):
            return spec[len(self.prefix):]
        return None

    def canonical_form(self, spec: str, argument: str) -> tuple[str, str]:
        """``(spec, argument)`` in their one spelling (:func:`canonical_task_spec`); as given without ``canonical``.
        Only a prefix source respells its spec."""
        if self.canonical is None:
            return spec.strip(), argument
        argument = self.canonical(argument)
        return (f"{self.prefix}{argument}" if self.prefix else spec.strip()), argument

    def own_settings(self) -> tuple[str, ...]:
        """The names of the settings this source adds to the shared ones."""
        return tuple(key for key in self.config.fields() if key not in SHARED_SETTINGS)

    def settings(self, shared: TaskLoadConfig) -> TaskLoadConfig:
        """``shared`` as this source's settings class (its own settings at their defaults unless given)."""
        if isinstance(shared, self.config):
            return shared
        return self.config(**{key: getattr(shared, key) for key in SHARED_SETTINGS})


# Built-in sources in the order --help lists them; other packages' follow, from their entry points.
BUILTIN_SOURCES = tuple(f"inca.tasks.{name}" for name in ("builtin", "hf", "tv", "folder"))
TASK_SOURCES: Registry[TaskSource] = Registry("task source", "inca.task_sources", builtins=BUILTIN_SOURCES)


def register_task_source(
    prefix_or_names: str | Sequence[str],
    *,
    load: LoadFn,
    spec_form: str,
    summary: str,
    check: CheckFn | None = None,
    config: type[TaskLoadConfig] = TaskLoadConfig,
    name: str | None = None,
    canonical: CanonicalFn | None = None,
    check_on_load: bool = True,
) -> TaskSource:
    """Add a task source to :data:`TASK_SOURCES` and return it.

    ``prefix_or_names`` is a prefix ending in ``:`` (``"hf:"``: the source is named ``hf``), one exact spec
    (``"digits"``), or several (then ``name`` names the family: ``synth``); ``canonical`` (prefix sources) gives
    the one spelling of an argument and ``check_on_load=False`` says the load makes every check of ``check``
    itself (see the module docstring). Settings of the source's own are
    fields of a ``config`` subclassing :class:`TaskLoadConfig`, each with a default, help and source (checked
    here, so a source missing one fails at import).
    """
    if isinstance(prefix_or_names, str) and prefix_or_names.endswith(":"):
        prefix, names = prefix_or_names, ()
    else:
        prefix, names = None, (prefix_or_names,) if isinstance(prefix_or_names, str) else tuple(prefix_or_names)
        if not names or not all(names):
            raise ValueError(f"task source {name!r}: give a prefix ending in ':' or one or more exact names")
    name = name or (prefix[:-1] if prefix else names[0] if len(names) == 1 else None)
    if not name:
        raise ValueError(f"task source claiming {', '.join(names)} needs a name for the family")
    if not spec_form or not summary:
        raise ValueError(f"task source {name!r} needs a spec_form and a summary")
    if canonical is not None and prefix is None:
        raise ValueError(f"task source {name!r}: canonical spellings are for a prefix's argument")
    if not issubclass(config, TaskLoadConfig):
        raise ValueError(f"task source {name!r}: its config must subclass TaskLoadConfig (shared settings)")
    config.check_definition(f"task source {name!r}")
    return TASK_SOURCES.register(name, TaskSource(name, prefix, names, load, spec_form, summary, check, config,
                                                  canonical, check_on_load))


def task_spec_forms() -> str:
    """Every registered spec form, comma-separated (``digits, synth-{...}, hf:NAME[:CONFIG], ...``)."""
    return ", ".join(source.spec_form for source in TASK_SOURCES.values())


def task_sources_help() -> str:
    """Every spec form with what it loads, for ``--tasks``' help."""
    return "; ".join(f"{source.spec_form} ({source.summary})" for source in TASK_SOURCES.values())


def find_task_source(spec: str) -> tuple[TaskSource, str]:
    """The source claiming ``spec`` and what the spec names for it; an unknown spec is one line naming the
    closest valid spec and every form."""
    spec = spec.strip()
    for source in TASK_SOURCES.values():
        argument = source.argument(spec)
        if argument is not None:
            return source, argument
    rest = spec.partition(":")[2]
    valid = [n for s in TASK_SOURCES.values() for n in s.names]
    valid += [f"{s.prefix}{rest}" for s in TASK_SOURCES.values() if s.prefix and rest]
    raise unknown_name("task spec", spec, valid, options=f"use one of: {task_spec_forms()}", matches=3)


def canonical_task_spec(spec: str) -> str:
    """The one spelling of the task ``spec`` names: ``folder:../data/faces/`` and ``folder:/home/me/data/faces``
    (or a symlink to it) are both ``folder:/home/me/data/faces``. Nothing is checked (a missing folder keeps its
    resolved path), so a spec recorded in a report can be compared with today's."""
    source, argument = find_task_source(spec)
    return source.canonical_form(spec, argument)[0]


def check_task_spec(spec: str, settings: TaskLoadConfig | None = None) -> str:
    """Cheap checks of a task spec (its form, and its source's own: a folder and its layout, a torchvision name
    and root), so a typo is reported before torch, a backbone or any other task is loaded; returns the spec's
    canonical spelling (:func:`canonical_task_spec`)."""
    source, argument = find_task_source(spec)
    if source.check is not None:
        source.check(spec.strip(), argument, source.settings(settings or TaskLoadConfig()))
    return canonical_task_spec(spec)


def check_task_specs(specs: Iterable[str], settings_for: Callable[[str], TaskLoadConfig]) -> list[str]:
    """Every spec checked (:func:`check_task_spec`, with ``settings_for(spec)``), one per task, in order: a task
    given twice (say, a folder by a relative and by an absolute path) is kept once, with a warning."""
    kept: dict[str, str] = {}
    for spec in specs:
        canonical = check_task_spec(spec, settings_for(spec))
        if canonical in kept:
            logger.warning("%s is the same task as %s (%s): it runs once", spec, kept[canonical], canonical)
        else:
            kept[canonical] = spec
    return list(kept.values())


def load_task(
    spec: str,
    data_root: str | None = None,
    download: bool = False,
    seed: int = 0,
    skip_bad_images: bool = False,
    *,
    settings: TaskLoadConfig | None = None,
) -> Task:
    """Load a task from its spec string; the task's ``spec`` is the canonical one (:func:`canonical_task_spec`),
    its ``typed_spec`` the spec as given. ``seed`` fixes how val/test are carved when a dataset lacks them;
    ``skip_bad_images`` drops unreadable image files (folder tasks) instead of refusing them. ``settings``
    gives all loading settings at once instead (with a source's own, as :func:`task_settings` reads them)."""
    if settings is None:
        settings = TaskLoadConfig(data_root=data_root, download=download, split_seed=seed,
                                  skip_bad_images=skip_bad_images)
    elif (data_root, download, seed, skip_bad_images) != (None, False, 0, False):
        raise TypeError("load_task: pass the loading settings as keywords or as settings=, not both")
    source, argument = find_task_source(spec)
    settings = source.settings(settings)
    if source.check is not None and source.check_on_load:
        source.check(spec.strip(), argument, settings)
    canonical, argument = source.canonical_form(spec, argument)  # the source asked once
    task = source.load(canonical, argument, settings)
    task.typed_spec = spec.strip()
    return task


def parse_task_list(specs: str | Iterable[str]) -> list[str]:
    """``"digits,synth-count"`` or a list of such strings -> one spec per task."""
    items = [specs] if isinstance(specs, str) else list(specs)
    out = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not out:
        raise InCAError(f"no tasks given: pass --tasks, e.g. --tasks digits,synth-count ({task_spec_forms()})")
    return out


def add_task_source_flags(parser: ArgumentContainer) -> None:
    """One flag per setting a source adds to the shared ones: ``--{source}-{setting}`` (``--noise-level``)."""
    for source in TASK_SOURCES.values():
        if source.own_settings():
            add_config_flags(parser, source.config, prefix=f"{source.name}-", where=f"task source {source.name}",
                             exclude=SHARED_SETTINGS)


def task_settings(args: argparse.Namespace, spec: str) -> TaskLoadConfig:
    """The settings ``spec``'s source loads with, from parsed flags: the shared ones (dests named as
    :class:`TaskLoadConfig`'s fields) and the source's own (:func:`add_task_source_flags`)."""
    source, _ = find_task_source(spec)
    shared = {key: getattr(args, key) for key in SHARED_SETTINGS}
    return config_from_args(source.config, args, prefix=f"{source.name}-", **shared)

