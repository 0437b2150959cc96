"""The registry of comparison methods: one :func:`register_method` call per method module.

A method is a config class (its hyper-parameters, see :mod:`inca.methods.base`) plus either the three
functions of an end-to-end method, trained by the shared loop of :mod:`inca.methods.run`:

* ``apply(model, config, context)``: decide what a fresh trainable copy of the backbone trains (add the
  method's modules, set ``requires_grad``);
* ``save(model, directory)`` / ``load(model, directory)``: the method's adapter in the one on-disk format of
  :func:`inca.adapters.common.write_adapter`, loaded onto a fresh copy of the same backbone;

or its own ``run`` (``inca``: a bank of adapters on the live frozen backbone).

:data:`METHODS` is a :class:`~inca.registry.Registry`: the built-in methods below, then those other packages
register through the ``inca.methods`` entry-point group. Method modules import torch only inside their
functions, so ``inca-compare --help`` lists every method without loading it.
"""

from __future__ import annotations

import os
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from inca.config import type_name
from inca.errors import InCAError
from inca.methods.base import ApplyContext, MethodConfig, RunConfig
from inca.methods.result import MethodResult
from inca.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from inca.backbone import Backbone
    from inca.tasks import Task

__all__ = [
    "METHODS",
    "Method",
    "get_method",
    "methods_help",
    "parse_method_args",
    "register_method",
    "resolve_methods",
]

ApplyFn = Callable[["nn.Module", MethodConfig, ApplyContext], None]
FileFn = Callable[["nn.Module", "str | os.PathLike"], Any]
ExportFn = Callable[["nn.Module", "str | os.PathLike", "Backbone", "str | None"], Any]
RunFn = Callable[["Method", "Backbone", "Task", MethodConfig, RunConfig, "str | os.PathLike"], MethodResult]


@dataclass(frozen=True)
class Method:
    """One comparison method (see the module docstring for ``apply``/``save``/``load``/``run``).

    ``features_only`` trains the head on pooled features computed once instead of through the backbone;
    ``shares_backbone`` marks a method that runs on the live frozen backbone instead of its own copy (its
    memory footprint includes the backbone's weights); ``export(model, directory, backbone, head_pool)`` writes
    a trained model in another library's format, with what rebuilds the backbone it was copied from (LoRA
    types: a PEFT adapter, see :func:`inca.adapters.peft_export.export_peft`).
    """

    name: str
    config: type[MethodConfig]
    summary: str
    apply: ApplyFn | None = None
    save: FileFn | None = None
    load: FileFn | None = None
    run: RunFn | None = None
    features_only: bool = False
    shares_backbone: bool = False
    export: ExportFn | None = None

    def make_config(self, values: MethodConfig | Mapping[str, Any] | None = None) -> MethodConfig:
        """The method's config from a config, or from (some of) its hyper-parameters, checked and typed."""
        if isinstance(values, self.config):
            return values
        return self.config.from_values(self.name, values)

    def defaults(self) -> dict[str, Any]:
        """Every hyper-parameter at its default, JSON-ready."""
        return self.config().to_dict()


# Built-in methods in the default ``--methods`` order; other packages' follow, from their entry points.
METHODS: Registry[Method] = Registry("method", "inca.methods", builtins=[
    f"inca.methods.{name}" for name in ("inca", "lora", "lora_ga", "compacter", "full", "linear")
])


def register_method(
    name: str,
    config: type[MethodConfig],
    summary: str,
    *,
    apply: ApplyFn | None = None,
    save: FileFn | None = None,
    load: FileFn | None = None,
    run: RunFn | None = None,
    features_only: bool = False,
    shares_backbone: bool = False,
    export: ExportFn | None = None,
) -> Method:
    """Add a method to :data:`METHODS` (``--methods`` order is registration order) and return it.

    An end-to-end method gives ``apply``, ``save`` and ``load``; any other gives its own
    ``run(method, backbone, task, config, settings, work_dir, log=None) -> MethodResult`` (``log``: the
    :class:`~inca.training_log.TrainingLog` its epochs go to, or None). Every hyper-parameter needs a default, a
    help text and a source (checked here, so a method missing one fails at import).
    """
    if run is None and None in (apply, save, load):
        raise ValueError(f"method {name!r} needs apply, save and load (end-to-end) or its own run")
    config.check_definition(f"method {name!r}")
    method = Method(name, config, summary, apply, save, load, run, features_only, shares_backbone, export)
    return METHODS.register(name, method)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a one-line error with the closest match."""
    return METHODS.get_entry(name)


def parse_method_args(
    items: Sequence[str | Mapping[str, Any]] | Mapping[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    """``["lora.rank=4", "linear.pool=mean"]`` and/or a recipe's ``{lora: {rank: 4}}`` -> checked, typed
    overrides per method; later items win. Values are YAML scalars; an unknown method or key is an error."""
    pairs: list[tuple[str, Any, str]] = []
    for item in [items] if isinstance(items, Mapping) else items or []:
        if isinstance(item, Mapping):
            for method, keys in item.items():
                if not isinstance(keys, Mapping):
                    raise InCAError(f"method_args.{method} must map hyper-parameters to values, e.g. {{rank: 4}}")
                pairs += [(f"{method}.{key}", value, f"{method}.{key}") for key, value in keys.items()]
            continue
        target, sep, value = str(item).partition("=")
        if not sep:
            raise InCAError(f"--method-args expects method.key=value, got {item!r} (e.g. lora.rank=4)")
        pairs.append((target.strip(), yaml.safe_load(value), str(item)))
    overrides: dict[str, dict[str, Any]] = {}
    for target, value, item in pairs:
        name, dot, key = target.rpartition(".")
        if not dot or not name or not key:
            raise InCAError(f"--method-args expects method.key=value, got {item!r} (e.g. lora.rank=4)")
        overrides.setdefault(name, {})[key] = get_method(name).config.coerce(name, key, value)
    return overrides


def resolve_methods(
    names: str | Sequence[str], method_args: Sequence[str | Mapping[str, Any]] | Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The chosen methods, in order, each with its full hyper-parameters (defaults + overrides), JSON-ready.

    Checks names, override keys, types and values up front, before anything trains.
    """
    items = [names] if isinstance(names, str) else list(names)
    chosen = list(dict.fromkeys(part.strip() for item in items for part in str(item).split(",") if part.strip()))
    if not chosen:
        raise InCAError(f"no methods given: pass --methods, e.g. --methods {','.join(METHODS)}")
    methods = [get_method(name) for name in chosen]
    overrides = parse_method_args(method_args)
    return {m.name: m.make_config(overrides.get(m.name)).to_dict() for m in methods}


def methods_help(width: int = 78) -> str:
    """Every registered method with its hyper-parameters, types, defaults and sources (``--help``'s epilog)."""
    lines = ["methods and their hyper-parameters (override with --method-args METHOD.KEY=VALUE):"]
    for method in METHODS.values():
        lines.append("")
        lines += textwrap.wrap(f"{method.name}: {method.summary}", width, initial_indent="  ",
                               subsequent_indent="    ")
        hints = typing.get_type_hints(method.config)
        for key, value in method.defaults().items():
            shown = value if isinstance(value, str) and value else repr(value)  # as typed in --method-args
            text = (f"{key}={shown} ({type_name(hints[key])}): {method.config.field_help(key)} "
                    f"[{method.config.field_source(key)}]")
            lines += textwrap.wrap(text, width, initial_indent="    ", subsequent_indent="        ")
    return "\n".join(lines)

