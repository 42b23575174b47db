"""What ``train`` accepts as a recipe, loaded into the :class:`LoadedRecipe` the engine runs.

- a path to a recipe TOML (``extends`` and all, as ``nexrl-async run`` reads it);
- a mapping shaped like the TOML (``{"run": {"total_steps": 30}, "rollout": {...}}``), with
  ``extends`` and relative paths resolved against ``base_dir`` (default: the working folder),
  where reference fields may hold Python objects and a data section may be a list of rows or a
  factory (:mod:`nexrl_async.api.objects`);
- a :class:`RecipeConfig` (or a :class:`LoadedRecipe`), possibly built in Python with objects
  in its reference fields.

Overrides are ``{"dotted.path": value}`` with the meaning of ``--set`` (the value is a Python
value, not TOML text), or ``--set`` strings ``"dotted.path=TOML"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from nexrl_async.api.objects import Registration, flatten_overrides, replace_objects
from nexrl_async.config.loader import LoadedRecipe, Override, load_recipe, load_recipe_dict
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.core.errors import ConfigError

RecipeLike = str | os.PathLike[str] | Mapping[str, Any] | RecipeConfig | LoadedRecipe
"""Anything :func:`nexrl_async.train` takes as its recipe."""

Overrides = Mapping[str, Any] | Sequence[str] | None
"""``{"run.total_steps": 30}`` or ``["run.total_steps=30"]``."""


def load_any(
    recipe: RecipeLike,
    overrides: Overrides,
    *,
    registration: Registration,
    base_dir: str | os.PathLike[str] | None = None,
) -> LoadedRecipe:
    """``recipe`` with ``overrides`` applied, validated and cross-checked (ConfigError else)."""
    pairs = _overrides(overrides, registration)
    if isinstance(recipe, str | os.PathLike):
        return load_recipe(Path(recipe), pairs)
    if isinstance(recipe, LoadedRecipe):
        if not pairs:
            return recipe
        base, name, raw = recipe.base_dir, recipe.path.name, _plain(recipe.config)
    elif isinstance(recipe, RecipeConfig):
        base, name, raw = _base(base_dir), "<python recipe>", _plain(recipe)
    elif isinstance(recipe, Mapping):
        base, name, raw = _base(base_dir), "<python recipe>", _plain(dict(recipe))
    else:
        raise ConfigError(
            f"recipe: expected a path, a mapping or a RecipeConfig, got {type(recipe).__name__}"
        )
    if isinstance(recipe, LoadedRecipe | RecipeConfig):
        raw.pop("extends", None)  # already merged in
    return load_recipe_dict(replace_objects(raw, registration), pairs, base_dir=base, name=name)


def _base(base_dir: str | os.PathLike[str] | None) -> Path:
    return Path(base_dir) if base_dir is not None else Path.cwd()


def _overrides(overrides: Overrides, registration: Registration) -> list[Override]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return list(flatten_overrides(overrides, registration))
    if isinstance(overrides, str):
        raise ConfigError("overrides: expected a mapping or a list of 'KEY=VALUE' strings")
    return list(overrides)


def _plain(value: Any) -> Any:
    """Structs as dicts (their tag included, ``None`` fields left out), recursively; any
    other object (a Python evaluator in a reference field) as it is."""
    if isinstance(value, msgspec.Struct):
        config = value.__struct_config__
        out: dict[str, Any] = {}
        if config.tag_field is not None:
            out[config.tag_field] = config.tag
        for name in value.__struct_fields__:
            item = getattr(value, name)
            if item is not None:
                out[name] = _plain(item)
        return out
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
