"""Run recipes: YAML files whose keys are the command-line options (command-line flags override them)."""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from .errors import InCAError, first_line

# Bounds on a recipe before any of it is built (inca's own choices): a recipe is a few dozen options, so
# these only ever stop a damaged or hostile file, such as YAML's "billion laughs" (aliases of aliases that
# expand exponentially) or thousands of nested lists (which would exhaust Python's recursion).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 32
MAX_RECIPE_VALUES = 10_000


def load_recipe(path: str | os.PathLike, valid_keys: set[str]) -> dict[str, Any]:
    """Read a recipe; keys may use dashes or underscores; an unknown or repeated key is an error that names it."""
    file = Path(path)
    if not file.is_file():
        raise InCAError(f"recipe {path} does not exist")
    size = file.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise InCAError(f"recipe {path} is {size} bytes, more than a recipe's limit of {MAX_RECIPE_BYTES}; "
                        "is it the right file?")
    try:
        text = file.read_text(encoding="utf-8")
        _check_size(text, path)
        data = yaml.load(text, Loader=_RecipeLoader) or {}  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError:
        raise InCAError(f"recipe {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    except _DuplicateKey as exc:
        raise InCAError(f"recipe {path}: key {exc.key!r} appears twice (lines {exc.lines[0]} and {exc.lines[1]}); "
                        "keep one") from None
    except yaml.YAMLError as exc:
        raise InCAError(f"recipe {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise InCAError(f"recipe {path} must be a mapping of option: value")
    recipe: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in recipe:
            raise InCAError(f"recipe {path}: option {name} is given twice (as {spelled[name]} and {key}); keep one")
        recipe[name], spelled[name] = value, str(key)
    unknown = sorted(set(recipe) - valid_keys)
    if unknown:
        raise InCAError(
            f"recipe {path} has unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(valid_keys))}"
        )
    return recipe


class _DuplicateKey(Exception):
    def __init__(self, key: Any, lines: tuple[int, int]) -> None:
        super().__init__(key)
        self.key, self.lines = key, lines


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (YAML 1.2 forbids it; PyYAML
    silently keeps the last value, so ``lr: 1e-3`` then ``lr: 0.5`` would train at 0.5)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults" then overriding a key is the point of a merge
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise _DuplicateKey(key, (seen[key], line))
            if isinstance(key, Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep)


def _check_size(text: str, path: str | os.PathLike) -> None:
    """Refuse nesting deeper than :data:`MAX_RECIPE_DEPTH` and more than :data:`MAX_RECIPE_VALUES` values once
    aliases are expanded, from the parser's events (a flat stream: nothing is built or expanded yet)."""
    open_nodes: list[list[Any]] = [[None, 0]]  # [anchor, values so far] of each collection being read
    values_of: dict[str, int] = {}  # anchor -> values under it, expanded
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_nodes) > MAX_RECIPE_DEPTH:
                raise InCAError(f"recipe {path} nests more than {MAX_RECIPE_DEPTH} levels deep (line "
                                f"{event.start_mark.line + 1}); a recipe is a mapping of option: value")
            open_nodes.append([event.anchor, 1])
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, count = open_nodes.pop()
            open_nodes[-1][1] += count
            if anchor is not None:
                values_of[anchor] = count
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            count = values_of.get(event.anchor, 1) if isinstance(event, yaml.AliasEvent) else 1
            if isinstance(event, yaml.ScalarEvent) and event.anchor is not None:
                values_of[event.anchor] = 1
            open_nodes[-1][1] += count
            if sum(n for _, n in open_nodes) > MAX_RECIPE_VALUES:
                raise InCAError(f"recipe {path} expands to more than {MAX_RECIPE_VALUES} values (line "
                                f"{event.start_mark.line + 1}; aliases of aliases?); a recipe is a mapping of "
                                "option: value")

