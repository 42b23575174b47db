"""Python objects in a recipe: evaluators, tools, workers, data factories and rows given as
objects rather than ``file.py:Name`` strings.

The recipe stays plain data: each object is put in a module of its own,
``nexrl_py_<hash>``, registered in :data:`sys.modules` for the run, and the recipe names it
``nexrl_py_<hash>:<name>`` like any ``package.module:Name`` reference. Every part of the engine
(the pre-flight, the rollout worker, the data reader, ``prepare_batch`` on every rank) loads it
the usual way.

A function or class defined at the top of an importable module (not ``__main__``) is named by
its own reference instead (``mypkg.rewards:score``; ``/abs/task.py:score`` for a module loaded
from a recipe folder), which ``config.toml`` can record and a later process can load. The hash
of a registered object is a function of what it is, not of where it lives in memory (a
function's module and name, the rows' content), so a script that runs again names its objects
the same way and can resume its run (``data`` must not change across a resume).
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import threading
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import msgspec.inspect as mi

from nexrl_async.config.schema import RecipeConfig
from nexrl_async.config.tree import field_map, pick_variant, struct_variants, unwrap
from nexrl_async.config.types import REF_MARK
from nexrl_async.core.usercode import PACKAGE_PREFIX

MODULE_PREFIX = "nexrl_py_"
"""Modules holding registered objects are named ``nexrl_py_<hash>``."""

_ROOT = mi.type_info(RecipeConfig)
_LOCK = threading.Lock()
_LIVE: dict[str, int] = {}
"""Registered module name -> how many live registrations use it."""


class Rows:
    """A data factory returning a fixed list of rows (what a list of dicts in a recipe becomes)."""

    def __init__(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self.rows = [dict(row) for row in rows]

    def __call__(self, **_: Any) -> list[dict[str, Any]]:
        return [dict(row) for row in self.rows]


class Registration:
    """The objects one run registered; :meth:`release` removes their modules again."""

    def __init__(self) -> None:
        self.modules: list[str] = []

    def ref(self, obj: Any, slot: str) -> str:
        """A ``module:Name`` reference that loads ``obj`` (registering it when needed)."""
        if isinstance(obj, list | tuple):
            obj = Rows(obj)
        own = _own_ref(obj)
        if own is not None:
            return own
        name = getattr(obj, "__name__", None)
        if not isinstance(name, str) or not name.isidentifier():
            name = slot.rpartition(".")[2] if slot.rpartition(".")[2].isidentifier() else "obj"
        digest = hashlib.sha1(f"{slot}\0{_identity(obj)}".encode()).hexdigest()[:12]
        with _LOCK:
            module_name, n = f"{MODULE_PREFIX}{digest}", 1
            while (
                module_name in _LIVE
                and getattr(sys.modules.get(module_name), name, None) is not obj
            ):
                n += 1
                module_name = f"{MODULE_PREFIX}{digest}_{n}"
            module = sys.modules.get(module_name)
            if module is None or module_name not in _LIVE:
                module = types.ModuleType(module_name, f"Python object of a recipe ({slot})")
                sys.modules[module_name] = module
            setattr(module, name, obj)
            _LIVE[module_name] = _LIVE.get(module_name, 0) + 1
            self.modules.append(module_name)
        return f"{module_name}:{name}"

    def release(self) -> None:
        """Unregister this run's modules (those no other live run uses)."""
        with _LOCK:
            for module_name in self.modules:
                left = _LIVE.get(module_name, 1) - 1
                if left > 0:
                    _LIVE[module_name] = left
                else:
                    _LIVE.pop(module_name, None)
                    sys.modules.pop(module_name, None)
            self.modules.clear()


def _own_ref(obj: Any) -> str | None:
    """The reference of a top-level function or class of an importable module, if it has one."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return None
    module_name, qualname = getattr(obj, "__module__", None), obj.__qualname__
    module = sys.modules.get(module_name or "")
    if module is None or module_name == "__main__" or not qualname.isidentifier():
        return None
    if getattr(module, qualname, None) is not obj:
        return None
    if module_name is not None and module_name.startswith(PACKAGE_PREFIX):
        file = getattr(module, "__file__", None)
        return f"{file}:{qualname}" if file else None
    return f"{module_name}:{qualname}"


def _identity(obj: Any) -> str:
    """What ``obj`` is, stably across processes: a function's module and name, the rows."""
    wrapped = getattr(obj, "__wrapped__", None)
    if wrapped is not None and wrapped is not obj:
        return f"wraps {_identity(wrapped)}"
    if isinstance(obj, Rows):
        try:
            return "rows " + hashlib.sha1(msgspec.json.encode(obj.rows)).hexdigest()
        except (TypeError, ValueError):
            return f"rows {id(obj)}"
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj):
        return f"{obj.__module__}:{obj.__qualname__}"
    kind = type(obj)
    return f"instance of {kind.__module__}:{kind.__qualname__}"


def replace_objects(raw: Mapping[str, Any], registration: Registration) -> dict[str, Any]:
    """``raw`` (nested dicts, as a recipe's TOML) with every Python object at a reference field
    replaced by its reference; a data section given as rows or a callable becomes
    ``{kind = "python", factory = ...}``."""
    assert isinstance(_ROOT, mi.StructType)
    return _walk(dict(raw), [_ROOT], registration, prefix="")


def _walk(
    raw: dict[str, Any], variants: Sequence[mi.StructType], reg: Registration, prefix: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        field = next((field_map(v)[key] for v in variants if key in field_map(v)), None)
        out[key] = value if field is None else _value(field.type, value, reg, dotted)
    return out


def _value(ftype: mi.Type, value: Any, reg: Registration, dotted: str) -> Any:
    inner, mark = unwrap(ftype)
    if mark == REF_MARK:
        return value if value is None or isinstance(value, str) else reg.ref(value, dotted)
    if isinstance(inner, mi.ListType) and isinstance(value, list | tuple):
        _, item_mark = unwrap(inner.item_type)
        if struct_variants(inner.item_type):  # a list of sections ([[data.sources]])
            return [_value(inner.item_type, v, reg, f"{dotted}.{i}") for i, v in enumerate(value)]
        if item_mark == REF_MARK:
            return [
                v if isinstance(v, str) else reg.ref(v, f"{dotted}.{i}")
                for i, v in enumerate(value)
            ]
        return value
    variants = struct_variants(ftype)
    if not variants:
        return value
    if _is_data(variants) and _rows_or_factory(value):
        return {"kind": "python", "factory": reg.ref(value, f"{dotted}.factory")}
    if isinstance(value, Mapping):
        picked = pick_variant(ftype, dict(value))
        return _walk(dict(value), [picked] if picked else variants, reg, prefix=f"{dotted}.")
    return value


def _is_data(variants: Sequence[mi.StructType]) -> bool:
    return any(v.tag == "python" and "factory" in field_map(v) for v in variants)


def _rows_or_factory(value: Any) -> bool:
    return isinstance(value, list | tuple) or (callable(value) and not isinstance(value, Mapping))


def flatten_overrides(
    overrides: Mapping[str, Any], registration: Registration
) -> list[tuple[str, Any]]:
    """``{"dotted.path": value}`` overrides as ``(path, value)`` pairs, Python objects replaced
    by references. A section's variant tag (``kind``, ``backend``) is set first, on its own, so
    that switching variant starts the section afresh (as ``--set data.kind=...`` does)."""
    pairs: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        replaced: Any = replace_objects(nested, registration)
        for part in parts:
            replaced = replaced.get(part) if isinstance(replaced, dict) else None
        if not isinstance(replaced, dict):
            pairs.append((key, replaced))
            continue
        tags = [tag for tag in _TAGS if tag in replaced]
        pairs += [(f"{key}.{tag}", replaced[tag]) for tag in tags]
        rest = {k: v for k, v in replaced.items() if k not in tags}
        if rest or not tags:
            pairs.append((key, rest))
    return pairs


_TAGS = ("kind", "backend")
"""Keys that select a section's variant."""
