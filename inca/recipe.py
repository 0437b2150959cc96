"""Run recipes: YAML files whose keys are the command-line options (command-line flags override them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import InCAError, first_line


def load_recipe(path: str | os.PathLike, valid_keys: set[str]) -> dict[str, Any]:
    """Read a recipe; keys may use dashes or underscores; an unknown key is an error that names it."""
    file = Path(path)
    if not file.is_file():
        raise InCAError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise InCAError(f"recipe {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise InCAError(f"recipe {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise InCAError(f"recipe {path} must be a mapping of option: value")
    recipe = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(recipe) - valid_keys)
    if unknown:
        raise InCAError(
            f"recipe {path} has unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(valid_keys))}"
        )
    return recipe


def as_list(value: Any) -> list[Any]:
    """A grid option: ``1e-3,3e-4``, ``[1e-3, 3e-4]`` or a scalar, as a list of YAML-typed values."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in as_list(item)]
    if isinstance(value, str):
        return [yaml.safe_load(part) for part in value.split(",") if part.strip()]
    return [value]
