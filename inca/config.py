"""Typed configs: the one way inca declares the settings of a method, a probe, a task source or a command.

A config is a frozen, keyword-only dataclass of :func:`hparam` fields. Each field holds its default, what it
does (``help``), where the default comes from (``source``: a paper's section, the authors' repository and
file, or inca's own choice and why), and optionally a value check (``check``, one of :mod:`inca.options`'
checkers). From that one declaration come the command-line flags (:func:`add_config_flags`), the recipe keys
(the flags' names), ``--help`` and the coercion of values typed by hand (``--method-args lora.rank=4``, a
recipe's ``method_args: {lora: {rank: 4}}``), with a one-line :class:`~inca.errors.InCAError` when a value
does not fit. This module imports no torch, so building a parser stays light.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import yaml

from .errors import InCAError
from .registry import unknown_name

__all__ = ["Config", "add_config_flags", "as_list", "config_from_args", "hparam", "type_name"]

Check = Callable[[Any], Any]


class ArgumentContainer(Protocol):
    """An :class:`argparse.ArgumentParser` or one of its argument groups."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action: ...


def hparam(
    default: Any = dataclasses.MISSING, *, help: str = "", source: str = "", check: Check | None = None,
    flag: str | None = None,
) -> Any:  # fmt: skip
    """A config field: its ``default``, what it does (``help``) and where the default comes from (``source``).

    ``check`` validates a value (each element of a list), raising :class:`argparse.ArgumentTypeError` (the
    :mod:`inca.options` checkers): a flag's text, a typed-by-hand value and a config built in code are all held to
    it (see :class:`Config`); ``flag`` overrides the generated
    flag name. A subclass that only changes the default may leave ``help`` empty: it is inherited from the
    base field. A list default is copied for every instance.
    """
    metadata = {"help": help, "source": source, "check": check, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=functools.partial(list, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every typed config (a frozen, keyword-only dataclass of :func:`hparam` fields).

    Every field's ``check`` runs when a config is made, however it is made (flags, values typed by hand, code), so a
    subclass declares its value checks with ``check=`` rather than in a ``__post_init__`` of its own; one that still
    needs a ``__post_init__`` (a check across fields) calls ``super().__post_init__()``."""

    FIELD_KIND: ClassVar[str] = "setting"  # what errors call a field ("lora has no hyper-parameter 'rnk'")

    def __post_init__(self) -> None:
        for key in self.fields():
            self._check(type(self).__name__, key, getattr(self, key))

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        """The fields by name, in declaration order."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def _inherited(cls, name: str, key: str) -> Any:
        """Field ``name``'s metadata ``key``: its own, else that of the nearest base class declaring one."""
        for klass in cls.__mro__:
            own = getattr(klass, "__dataclass_fields__", {}).get(name)
            if own is not None and own.metadata.get(key):
                return own.metadata[key]
        return None

    @classmethod
    def field_help(cls, name: str) -> str:
        """What ``name`` does: its own help, else that of the nearest base class declaring it."""
        return cls._inherited(name, "help") or ""

    @classmethod
    def field_source(cls, name: str) -> str:
        """Where ``name``'s default comes from."""
        return cls._inherited(name, "source") or ""

    @classmethod
    def default(cls, name: str) -> Any:
        """Field ``name``'s default value (a fresh copy for a list)."""
        field = cls.fields()[name]
        return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default

    @classmethod
    def coerce(cls, where: str, key: str, value: Any) -> Any:
        """``value`` as field ``key``'s type (YAML reads ``1e-3`` as a string, ``3`` as an int), checked by its
        ``check``; ``where`` names the owner (a method, a probe) in the error, and an unknown ``key`` is one with
        the closest field's name."""
        keys = list(cls.fields())
        if key not in keys:
            raise unknown_name(cls.FIELD_KIND, key, keys, wording=f"{where} has no {cls.FIELD_KIND} {key!r}",
                               options=f"its keys: {', '.join(keys)}")
        typed = _coerce(value, typing.get_type_hints(cls)[key], f"{where}.{key}", cls.default(key))
        cls._check(where, key, typed)
        return typed

    @classmethod
    def _check(cls, where: str, key: str, value: Any) -> None:
        """Field ``key``'s check on ``value`` (each element of a list; None, a field left unset, is not checked)."""
        check = cls._inherited(key, "check")
        if check is None or value is None:
            return
        try:
            for item in value if isinstance(value, list) else [value]:
                check(item)
        except argparse.ArgumentTypeError as exc:
            raise InCAError(f"{where}.{key}: {exc}") from None

    @classmethod
    def check_definition(cls, owner: str) -> None:
        """Every field has a default, a help text and a source (so an extension missing one fails at import)."""
        try:
            cls()
        except TypeError as exc:
            raise ValueError(f"{owner}: every field of {cls.__name__} needs a default") from exc
        for key in cls.fields():
            if not cls.field_help(key) or not cls.field_source(key):
                raise ValueError(f"{owner}: {key!r} needs help and source metadata ({cls.__name__}'s field)")

    @classmethod
    def from_values(cls, where: str, values: Mapping[str, Any] | None = None) -> Config:
        """A config from (some of) its fields' values, each coerced and checked (:meth:`coerce`: an unknown key is
        an error naming the closest one)."""
        return cls(**{key: cls.coerce(where, key, value) for key, value in dict(values or {}).items()})

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (what reports record and hash)."""
        return dataclasses.asdict(self)


def type_name(tp: Any) -> str:
    """``int``, ``list of float``, ``str or None``: a field type in words, for help and errors."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return f"list of {type_name(args[0])}"
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, default: Any) -> Any:
    bad = InCAError(f"{where} expects a {type_name(tp)} like {default!r}, got {value!r}")
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:  # a grid: one value or several
        try:
            return [_coerce(v, args[0], where, default) for v in (value if isinstance(value, list) else [value])]
        except InCAError:
            raise bad from None
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:  # X | None
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where, default)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)  # layers: [0, 5] -> "0,5"
    raise TypeError(f"{where}: fields of type {type_name(tp)} are not supported")


# ------------------------------------------------------------------------------------------------------------
# Command-line flags generated from a config
# ------------------------------------------------------------------------------------------------------------


def as_list(value: Any) -> list[Any]:
    """A flag's text, a recipe's value or a list of them as YAML-typed values: ``1e-3,3e-4`` -> [0.001, 0.0003],
    ``[1e-3, "3e-4,1e-4"]`` -> three values, a scalar -> [scalar], None -> []."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in as_list(item)]
    if isinstance(value, str):
        return [yaml.safe_load(part) for part in value.split(",") if part.strip()]
    return [value]


def _flag_type(config: type[Config], key: str, where: str) -> Callable[[Any], Any]:
    """The argparse ``type`` of field ``key``: typed and checked as :meth:`Config.coerce` does, a failure as
    :class:`argparse.ArgumentTypeError` (argparse names the flag). The field's check sees each value first, so a
    flag's error is in the check's words (``--epochs: expected a positive integer, got 'two'``)."""
    tp = typing.get_type_hints(config)[key]
    many = typing.get_origin(tp) is list
    verbatim = not many and _required(tp) is str  # a str (or str | None) field keeps its text as typed
    check = config._inherited(key, "check")

    def parse(text: Any) -> Any:
        values = [text.strip()] if verbatim and isinstance(text, str) else as_list(text)  # "0,5,11" stays
        if not many and len(values) != 1:
            raise argparse.ArgumentTypeError(f"expected one {type_name(tp)}, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"expected one or more comma-separated values, got {text!r}")
        if check is not None:
            for value in values:
                check(value)
        try:
            return config.coerce(where, key, values if many else values[0])
        except InCAError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    parse.__name__ = type_name(tp)  # argparse's "invalid <name> value" wording
    return parse


def flag_name(config: type[Config], key: str, prefix: str = "") -> str:
    """The command-line flag of field ``key``: ``--{prefix}{key}`` with dashes, unless the field names one."""
    return config._inherited(key, "flag") or f"--{prefix}{key}".replace("_", "-")


def add_config_flags(
    parser: ArgumentContainer, config: type[Config], *, prefix: str = "",
    where: str = "", exclude: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """One flag per field of ``config`` (``--{prefix}{field}``; dest ``{prefix}{field}``), its help with the
    default's source. A list field takes comma- or space-separated values (``--lr 1e-3,3e-4`` or
    ``--lr 1e-3 3e-4``); a bool field is a switch."""
    for key in config.fields():
        if key in exclude:
            continue
        tp = typing.get_type_hints(config)[key]
        flag, dest = flag_name(config, key, prefix), f"{prefix}{key}".replace("-", "_")
        help_text = f"{config.field_help(key)} [{config.field_source(key)}]".replace("%", "%%")
        default = config.default(key)
        if tp is bool:
            parser.add_argument(flag, dest=dest, action="store_true", default=default, help=help_text)
            continue
        many = typing.get_origin(tp) is list
        choices = getattr(config._inherited(key, "check"), "choices", None)  # inca.options.choice's names
        metavar = type_name(typing.get_args(tp)[0] if many else _required(tp)).upper().replace(" ", "_")
        parser.add_argument(
            flag, dest=dest, type=_flag_type(config, key, where or config.__name__), default=default,
            nargs="+" if many else None, help=help_text, metavar="{" + ",".join(choices) + "}" if choices else metavar,
        )  # fmt: skip


def _required(tp: Any) -> Any:
    """``X`` of an ``X | None`` field (None is the flag left out), else ``tp`` itself."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    return args[0] if optional and len(args) == 1 else tp


def config_from_args(config: type[Config], args: argparse.Namespace, *, prefix: str = "", **fixed: Any) -> Config:
    """The config whose fields are the parsed flags of :func:`add_config_flags` (``fixed`` sets others)."""
    values: dict[str, Any] = {}
    for key in config.fields():
        if key in fixed:
            continue
        value = getattr(args, f"{prefix}{key}".replace("-", "_"))
        if isinstance(value, list) and any(isinstance(v, list) for v in value):
            value = [v for item in value for v in (item if isinstance(item, list) else [item])]
        values[key] = value
    return config(**values, **fixed)
