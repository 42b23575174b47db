"""Load a recipe: TOML → ``extends`` chain → ``--set`` overrides → validated :class:`RecipeConfig`.

Every failure is a :class:`~nexrl_async.core.errors.ConfigError` with one line naming the file,
the dotted path, the bad value and what was expected. Which file set a value is tracked through
the ``extends`` chain and overrides, so an error points at the file to edit.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import tomli_w

from nexrl_async.config.checks import cross_check
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.config.tree import (
    check_override_path,
    field_map,
    pick_variant,
    resolve_paths,
    struct_variants,
    tag_of,
)
from nexrl_async.core.errors import ConfigError


def _root_type() -> mi.StructType:
    info = mi.type_info(RecipeConfig)
    assert isinstance(info, mi.StructType)
    return info


_ROOT = _root_type()

Provenance = dict[str, str]
"""Dotted path → the file (or ``--set``) that last set it."""


class LoadedRecipe(msgspec.Struct, frozen=True, kw_only=True):
    """A validated recipe with where it came from."""

    config: RecipeConfig
    path: Path
    """The recipe file given on the command line."""
    files: list[Path]
    """Every file of the ``extends`` chain, base first."""
    overrides: list[str] = []
    """The ``--set`` overrides applied, in order."""

    @property
    def base_dir(self) -> Path:
        return self.path.parent


Override = str | tuple[str, Any]
"""A ``--set`` override: ``"KEY.PATH=TOML_VALUE"``, or ``(KEY.PATH, value)`` from Python."""


def load_recipe(path: str | Path, overrides: Sequence[Override] = ()) -> LoadedRecipe:
    """Read, merge, override, validate and cross-check a recipe file."""
    recipe = Path(path).expanduser().resolve()
    provenance: Provenance = {}
    files: list[Path] = []
    merged = _load_chain(recipe, provenance, files, stack=())
    return _finish(merged, provenance, recipe, files, overrides)


def load_recipe_dict(
    raw: Mapping[str, Any],
    overrides: Sequence[Override] = (),
    *,
    base_dir: Path,
    name: str = "<python recipe>",
) -> LoadedRecipe:
    """A recipe given as nested dicts (the TOML's tables), loaded as if it were the file
    ``base_dir/name``: relative paths, ``file.py:Name`` refs and ``extends`` resolve against
    ``base_dir``, and errors name ``name``."""
    recipe = (base_dir.expanduser().resolve()) / name
    try:
        data: dict[str, Any] = msgspec.to_builtins(dict(raw))  # a deep copy of plain values
    except TypeError as err:
        raise ConfigError(f"not a recipe value: {err}", file=str(recipe)) from None
    provenance: Provenance = {}
    files: list[Path] = []
    resolve_paths(data, _ROOT, recipe.parent)
    base: dict[str, Any] = {}
    parent = data.get("extends")
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"extends = {parent!r}: expected a file name", file=str(recipe))
        base = _load_chain((recipe.parent / parent).resolve(), provenance, files, (recipe,))
    files.append(recipe)
    _merge(base, data, provenance, str(recipe), prefix="")
    return _finish(base, provenance, recipe, files, overrides)


def _finish(
    merged: dict[str, Any],
    provenance: Provenance,
    recipe: Path,
    files: list[Path],
    overrides: Sequence[Override],
) -> LoadedRecipe:
    for item in overrides:
        _apply_override(merged, item, provenance)
    config = _convert(merged, provenance, recipe)
    for dotted, message in cross_check(config):
        raise ConfigError(message, file=_source(provenance, dotted, recipe), path=dotted)
    shown = [item if isinstance(item, str) else f"{item[0]}={_show(item[1])}" for item in overrides]
    return LoadedRecipe(config=config, path=recipe, files=files, overrides=shown)


def dump_recipe(config: RecipeConfig) -> str:
    """The resolved recipe as TOML (``None`` fields omitted), self-contained: its ``extends``
    chain is already merged in, so it is named in a comment, not as a key (a run folder's
    ``config.toml`` must load without the base file next to it). Loads back to the same config
    but for ``extends``."""
    resolved = _drop_none(msgspec.to_builtins(config))
    base = resolved.pop("extends", None)
    note = f"# resolved recipe; it extended {base!r}, merged in below\n" if base else ""
    return note + tomli_w.dumps(resolved)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _read_toml(path: Path, referrer: Path | None) -> dict[str, Any]:
    where = f" (extended by {referrer.name})" if referrer else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found{where}", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"not a text file{where}: byte {err.start} is not UTF-8", file=str(path)
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read recipe{where}: {err.strerror}", file=str(path)) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}", file=str(path)) from None


def _load_chain(
    path: Path, provenance: Provenance, files: list[Path], stack: tuple[Path, ...]
) -> dict[str, Any]:
    if path in stack:
        cycle = " -> ".join(p.name for p in (*stack, path))
        raise ConfigError(f"extends: cyclic chain {cycle}", file=str(stack[-1]), path="extends")
    raw = _read_toml(path, stack[-1] if stack else None)
    resolve_paths(raw, _ROOT, path.parent)
    base: dict[str, Any] = {}
    parent = raw.get("extends")
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"extends = {parent!r}: expected a file name", file=str(path))
        base = _load_chain((path.parent / parent).resolve(), provenance, files, (*stack, path))
    files.append(path)
    _merge(base, raw, provenance, str(path), prefix="")
    return base


def _merge(
    base: dict[str, Any], top: dict[str, Any], provenance: Provenance, source: str, prefix: str
) -> None:
    """Deep-merge ``top`` into ``base`` (tables merge, everything else replaces)."""
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            if _tag_changed(base[key], value):
                base[key] = {}
            _merge(base[key], value, provenance, source, prefix=f"{dotted}.")
        else:
            base[key] = value
            provenance[dotted] = source
            _mark_children(value, dotted, provenance, source)


_TAGS = ("kind", "backend")
"""Keys that select a section's variant."""


def _tag_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A section switching variant (``kind``/``backend``) starts from scratch, not a mix."""
    return any(tag in new and tag in old and new[tag] != old[tag] for tag in _TAGS)


def _mark_children(value: Any, dotted: str, provenance: Provenance, source: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            provenance[f"{dotted}.{k}"] = source
            _mark_children(v, f"{dotted}.{k}", provenance, source)


def _apply_override(merged: dict[str, Any], item: Override, provenance: Provenance) -> None:
    if isinstance(item, str):
        key, sep, text = item.partition("=")
        key = key.strip()
        value = _parse_literal(text)
    else:
        (key, value), sep = item, "="
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"expected KEY.PATH=VALUE, got {item!r}", file="--set")
    problem = check_override_path(_ROOT, merged, key)
    if problem is not None:
        raise ConfigError(problem, file=f"--set {key}", path=key)
    node: Any = merged
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):  # an entry of a list of sections (checked to exist)
            node = node[int(part)]
            continue
        child = node.get(part)
        if not isinstance(child, dict | list):
            child = node[part] = {}
        node = child
    if isinstance(node, list):  # a whole entry of a list of sections
        node[int(parts[-1])] = value
        provenance[key] = f"--set {key}"
        _mark_children(value, key, provenance, f"--set {key}")
        return
    if parts[-1] in _TAGS and _current_tag(node, parts[:-1], parts[-1]) not in (None, value):
        node.clear()  # switching variant starts the section from scratch, as ``extends`` does
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        _merge(node[parts[-1]], value, provenance, f"--set {key}", prefix=f"{key}.")
    else:
        node[parts[-1]] = value
        provenance[key] = f"--set {key}"
        _mark_children(value, key, provenance, f"--set {key}")


def _current_tag(node: dict[str, Any], section: list[str], tag: str) -> Any:
    """The variant tag the section at ``section`` has now: set in ``node``, else its default."""
    if tag in node:
        return node[tag]
    st: mi.StructType = _ROOT
    field: mi.Field | None = None
    for part in section:
        field = field_map(st).get(part)
        variants = [] if field is None else struct_variants(field.type)
        if field is None or not variants:
            return None
        st = variants[0]
    default = None if field is None else field.default
    if isinstance(default, msgspec.Struct) and default.__struct_config__.tag_field == tag:
        return tag_of(default)
    return None


def _parse_literal(text: str) -> Any:
    """A TOML literal (``3``, ``true``, ``"x"``, ``[1, 2]``, ``{a = 1}``); else a bare string."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<at>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]+)`")
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]+)`")


def _convert(merged: dict[str, Any], provenance: Provenance, recipe: Path) -> RecipeConfig:
    try:
        return msgspec.convert(merged, RecipeConfig)
    except msgspec.ValidationError as err:
        raise _config_error(str(err), merged, provenance, recipe) from None


def _config_error(
    text: str, merged: dict[str, Any], provenance: Provenance, recipe: Path
) -> ConfigError:
    m = _AT.match(text)
    assert m is not None
    msg, at = m["msg"], _dotted(m["at"] or "")
    if unknown := _UNKNOWN.match(msg):
        dotted = f"{at}.{unknown['name']}" if at else unknown["name"]
        what = f"unknown section [{dotted}]" if not at else f"unknown key {dotted}"
        hint = _suggest(unknown["name"], at, merged)
        return ConfigError(f"{what}{hint}", file=_source(provenance, dotted, recipe), path=dotted)
    if missing := _MISSING.match(msg):
        dotted = f"{at}.{missing['name']}" if at else missing["name"]
        file = _source(provenance, at, recipe) if at else str(recipe)
        return ConfigError(f"{dotted} is required but missing", file=file, path=dotted)
    value = _lookup(merged, at)
    msg = msg.replace("`", "")
    expected = msg[0].lower() + msg[1:] if msg else "a valid value"
    expected += _variant_hint(at)
    shown = _show(value)
    return ConfigError(f"{at} = {shown}: {expected}", file=_source(provenance, at, recipe), path=at)


def _variant_hint(at: str) -> str:
    """For a bad variant tag (``inference.backend``, ``model.kind``): the tags there are."""
    section, _, last = at.rpartition(".")
    if last not in _TAGS:
        return ""
    st: mi.StructType = _ROOT
    variants: list[mi.StructType] = []
    for part in section.split(".") if section else []:
        sub = field_map(st).get(part)
        variants = [] if sub is None else struct_variants(sub.type)
        if not variants:
            return ""
        st = variants[0]
    tags = [repr(v.tag) for v in variants if v.tag is not None]
    return f" (expected one of {', '.join(tags)})" if tags else ""


def _dotted(at: str) -> str:
    return re.sub(r"\[(\d+)\]", r".\1", at).lstrip(".")


def _lookup(merged: dict[str, Any], dotted: str) -> Any:
    node: Any = merged
    for part in dotted.split(".") if dotted else []:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _show(value: Any) -> str:
    try:
        return tomli_w.dumps({"v": value}).strip()[4:]
    except (TypeError, ValueError):
        return repr(value)


def _suggest(name: str, at: str, merged: dict[str, Any]) -> str:
    st: mi.StructType = _ROOT
    data: Any = merged
    variants: list[mi.StructType] = [st]
    for part in at.split(".") if at else []:
        sub = field_map(st).get(part)
        variants = [] if sub is None else struct_variants(sub.type)
        if sub is None or not variants:
            return ""
        data = data.get(part) if isinstance(data, dict) else None
        st = pick_variant(sub.type, data) or variants[0]
    if st.tag_field is not None and isinstance(data, dict) and st.tag_field in data:
        if any(name in field_map(v) for v in variants):  # a key of another variant
            return f" (not a key of {at}.{st.tag_field} = {data[st.tag_field]!r})"
    close = difflib.get_close_matches(name, list(field_map(st)), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _source(provenance: Provenance, dotted: str, recipe: Path) -> str:
    """The file that set ``dotted`` (or its nearest set ancestor), else the top recipe."""
    parts = dotted.split(".") if dotted else []
    for n in range(len(parts), 0, -1):
        found = provenance.get(".".join(parts[:n]))
        if found is not None:
            return found
    return str(recipe)
