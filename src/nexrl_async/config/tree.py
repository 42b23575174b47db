"""Walking the schema's type tree: field lookup for ``--set`` paths and path-field resolution.

Uses ``msgspec.inspect`` so the schema stays the single source of truth: a field is a path or a
user-code reference when its annotation carries the marker from :mod:`nexrl_async.config.types`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec.inspect as mi

from nexrl_async.config.types import CWD_MARK, PATH_MARK, REF_MARK


def unwrap(t: mi.Type) -> tuple[mi.Type, str | None]:
    """Strip ``Metadata`` (and ``X | None``) from a type; return it and its nexrl marker."""
    mark = None
    while True:
        if isinstance(t, mi.Metadata):
            extra = t.extra or {}
            mark = mark or extra.get("nexrl")
            t = t.type
        elif isinstance(t, mi.UnionType):
            non_none = [a for a in t.types if not isinstance(a, mi.NoneType)]
            if len(non_none) != 1:
                return t, mark
            t = non_none[0]
        else:
            return t, mark


def struct_variants(t: mi.Type) -> list[mi.StructType]:
    """The Struct types a (possibly union) type admits."""
    t, _ = unwrap(t)
    if isinstance(t, mi.StructType):
        return [t]
    if isinstance(t, mi.UnionType):
        return [a for a in (unwrap(x)[0] for x in t.types) if isinstance(a, mi.StructType)]
    return []


def pick_variant(t: mi.Type, raw: Any) -> mi.StructType | None:
    """The Struct a raw dict converts to: the only one, or the one its tag names."""
    variants = struct_variants(t)
    if len(variants) == 1:
        return variants[0]
    for v in variants:
        if isinstance(raw, dict) and v.tag_field and raw.get(v.tag_field) == v.tag:
            return v
    return None


def field_map(st: mi.StructType) -> dict[str, mi.Field]:
    return {f.encode_name: f for f in st.fields}


def resolve_paths(raw: dict[str, Any], st: mi.StructType, base_dir: Path) -> None:
    """Rewrite relative path and ``file.py:Name`` fields of ``raw`` in place, against base_dir."""
    fields = field_map(st)
    for key, value in raw.items():
        field = fields.get(key)
        if field is None:
            continue
        ftype, mark = unwrap(field.type)
        if mark is not None:
            raw[key] = _resolve_value(value, mark, base_dir)
        elif isinstance(ftype, mi.ListType):
            _, item_mark = unwrap(ftype.item_type)
            if item_mark is not None and isinstance(value, list):
                raw[key] = [_resolve_value(v, item_mark, base_dir) for v in value]
            elif isinstance(value, list):  # a list of sections, e.g. [[data.sources]]
                for entry in value:
                    sub = pick_variant(ftype.item_type, entry)
                    if isinstance(entry, dict) and sub is not None:
                        resolve_paths(entry, sub, base_dir)
        elif isinstance(value, dict):
            sub = pick_variant(field.type, value)
            if sub is not None:
                resolve_paths(value, sub, base_dir)


def _resolve_value(value: Any, mark: str, base_dir: Path) -> Any:
    if not isinstance(value, str) or not value:
        return value
    if mark == PATH_MARK:
        if value.startswith(CWD_MARK):  # the working directory of the run, not the recipe's
            value = str(Path.cwd()) + value[len(CWD_MARK) :]
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())
    if mark == REF_MARK:
        target, sep, name = value.rpartition(":")
        if sep and target.endswith(".py") and not Path(target).is_absolute():
            return f"{(base_dir / target).resolve()}:{name}"
    return value


def check_override_path(root: mi.StructType, merged: dict[str, Any], dotted: str) -> str | None:
    """``None`` if ``dotted`` names a field of the schema, else a message saying why not.

    An entry of a list of sections is named by its index (``data.sources.1.weight``); it must
    already be in the recipe (``--set data.sources=[...]`` replaces the whole list).
    """
    st: mi.StructType | None = root
    raw: Any = merged
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        part = parts[i]
        if st is None:
            return None  # below a free-form dict: any key is allowed
        fields = field_map(st)
        if part == st.tag_field and i == len(parts) - 1:
            return None
        if part not in fields:
            where = ".".join(parts[:i]) or "the recipe root"
            known = ", ".join(sorted(fields))
            return f"unknown key {part!r} in {where} (known: {known})"
        section, _ = unwrap(fields[part].type)
        raw = raw.get(part) if isinstance(raw, dict) else None
        if i == len(parts) - 1:
            return None
        if isinstance(section, mi.DictType):
            st, i = None, i + 1
            continue
        if isinstance(section, mi.ListType) and struct_variants(section.item_type):
            problem = _list_entry(parts[: i + 1], parts[i + 1], raw)
            if problem is not None or i + 1 == len(parts) - 1:
                return problem
            raw, section, i = raw[int(parts[i + 1])], section.item_type, i + 1
        variants = struct_variants(section)
        if not variants:
            return f"{'.'.join(parts[: i + 1])} is a value, not a section"
        picked = pick_variant(section, raw or {})
        if picked is None:
            tag = variants[0].tag_field
            if parts[i + 1] == tag and i + 1 == len(parts) - 1:
                return None
            return f"set {'.'.join(parts[: i + 1])}.{tag} before its other keys"
        st, i = picked, i + 1
    return None


def _list_entry(at: list[str], index: str, raw: Any) -> str | None:
    """Why ``index`` names no entry of the list of sections ``raw`` (at ``at``), or ``None``."""
    size = len(raw) if isinstance(raw, list) else 0
    if index.isdigit() and int(index) < size:
        return None
    where = ".".join(at)
    return (
        f"{where}.{index}: {where} has {size} entries (0-based); set an existing one, or the "
        f"whole list with --set {where}=[...]"
    )


def tag_of(value: object) -> str:
    """The tag (``kind``/``backend`` value) of a tagged-union Struct instance."""
    tag = type(value).__struct_config__.tag  # type: ignore[attr-defined]
    return str(tag)
