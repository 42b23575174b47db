"""The recipe reference (docs/recipe.md), generated from the schema.

Every field of :class:`~nexrl_async.config.schema.RecipeConfig`, reached through sections,
tagged-union variants and lists of tables, with its dotted path, type, default and docstring.
Field docstrings are the string literal under each annotated attribute in the source (msgspec
keeps no docstrings), read with :mod:`ast`. Regenerate after changing the schema::

    python -m nexrl_async.config.reference docs/recipe.md

``--check docs/recipe.md`` exits 1 when the file differs from what the schema generates.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from nexrl_async.config.schema import RecipeConfig
from nexrl_async.config.types import PATH_MARK, REF_MARK

COMMAND = "python -m nexrl_async.config.reference docs/recipe.md"
"""The command that regenerates docs/recipe.md (run from the repository root)."""

_HEADER = f"""\
# Recipe reference

<!-- Generated from the schema in src/nexrl_async/config/ by `{COMMAND}`.
     Do not edit by hand: change the field docstrings and regenerate. -->

A recipe is one TOML file. Every section below is optional except `[model]`, `[data]` and
`[rollout]` (with `rollout.evaluator`). A section with several variants picks one with its
tag key (`kind` or `backend`); the variant decides which other keys the section accepts.
Unknown keys are errors naming the key. Paths and `file.py:Name` references are resolved
against the folder of the recipe file that sets them. `extends = "base.toml"` starts from
another recipe (tables merge, values replace; switching a section's variant starts that
section afresh), and `--set a.b=value` on the command line overrides any key below
(`nexrl-async check RECIPE` validates a recipe without running it). The user guide is
[docs/guide.md](guide.md).
"""


@functools.cache
def _module_tree(name: str) -> ast.Module:
    module = importlib.import_module(name)
    return ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of the attributes ``cls`` itself declares (not inherited)."""
    for node in ast.walk(_module_tree(cls.__module__)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            body = node.body
            docs = {}
            for stmt, nxt in zip(body, [*body[1:], None], strict=True):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
            return docs
    return {}


def _owner(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO that declares field ``name``."""
    for klass in cls.__mro__:
        if name in inspect.get_annotations(klass):
            return klass
    return cls


def _doc(cls: type, name: str) -> str:
    return field_docs(_owner(cls, name)).get(name, "")


def _markdown(text: str) -> str:
    """reST-isms of the docstrings as Markdown: ````x```` → `` `x` ``, ``:func:`f``` → `` `f` ``."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r"(?<![\w/`])docs/(\w+)\.md", r"[docs/\1.md](\1.md)", text)
    return text.replace("``", "`")


def _value(v: Any) -> str:
    """A default as it is written in TOML."""
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _bounds(t: mi.IntType | mi.FloatType) -> str:
    parts = []
    for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        bound = getattr(t, attr)
        if bound is not None:
            parts.append(f"{sign} {bound}")
    return f" {', '.join(parts)}" if parts else ""


def _type(t: mi.Type, mark: str | None = None) -> str:
    """One line naming what a value may be."""
    if isinstance(t, mi.Metadata):
        extra = t.extra or {}
        return _type(t.type, mark or extra.get("nexrl"))
    if isinstance(t, mi.UnionType):
        return " or ".join(_type(a, mark) for a in t.types if not isinstance(a, mi.NoneType))
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(f"`{_value(v)}`" for v in t.values)
    if isinstance(t, mi.BoolType):
        return "bool"
    if isinstance(t, mi.IntType):
        return "int" + _bounds(t)
    if isinstance(t, mi.FloatType):
        return "float" + _bounds(t)
    if isinstance(t, mi.StrType):
        if mark == PATH_MARK:
            return "path"
        if mark == REF_MARK:
            return "reference (`file.py:Name` or `package.module:Name`)"
        return "string"
    if isinstance(t, mi.ListType):
        size = ""
        if t.min_length is not None and t.min_length == t.max_length:
            size = f" ({t.min_length} items)"
        return f"list of {_type(t.item_type)}{size}"
    if isinstance(t, mi.DictType):
        return f"table of {_type(t.key_type)} → {_type(t.value_type)}"
    if isinstance(t, mi.StructType):
        return "table"
    return type(t).__name__.removesuffix("Type").lower()


def _strip(t: mi.Type) -> tuple[mi.Type, bool]:
    """``t`` without ``Metadata`` and ``None`` arms; whether ``None`` was allowed."""
    optional = False
    while True:
        if isinstance(t, mi.Metadata):
            t = t.type
        elif isinstance(t, mi.UnionType) and any(isinstance(a, mi.NoneType) for a in t.types):
            rest = tuple(a for a in t.types if not isinstance(a, mi.NoneType))
            optional = True
            t = rest[0] if len(rest) == 1 else mi.UnionType(types=rest)
        else:
            return t, optional


def _structs(t: mi.Type) -> list[mi.StructType]:
    t, _ = _strip(t)
    if isinstance(t, mi.StructType):
        return [t]
    if isinstance(t, mi.UnionType):
        found = [_strip(a)[0] for a in t.types]
        if found and all(isinstance(a, mi.StructType) for a in found):
            return [a for a in found if isinstance(a, mi.StructType)]
    return []


def _section_of(t: mi.Type) -> tuple[list[mi.StructType], str] | None:
    """The structs below a field and how it nests: ``""`` table, ``"[]"`` list, ``".<name>"``."""
    bare, _ = _strip(t)
    if structs := _structs(bare):
        return structs, ""
    if isinstance(bare, mi.ListType) and (structs := _structs(bare.item_type)):
        return structs, "[]"
    if isinstance(bare, mi.DictType) and (structs := _structs(bare.value_type)):
        return structs, ".<name>"
    return None


def _default(field: mi.Field) -> str:
    if field.required:
        return "**required**"
    if field.default_factory is not msgspec.NODEFAULT:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, msgspec.Struct):
        tag = value.__struct_config__.tag
        if tag is not None:
            return f"default `{value.__struct_config__.tag_field} = {_value(tag)}`"
        return "the section's defaults"
    if value is None:
        return "default: unset"
    return f"default `{_value(msgspec.to_builtins(value))}`"


class _Writer:
    """Walks the schema from the root and writes one Markdown section per table."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.seen: dict[tuple[type, ...], str] = {}
        self.toc: list[tuple[int, str]] = []

    def section(self, path: str, structs: list[mi.StructType], depth: int, doc: str) -> None:
        key = tuple(s.cls for s in structs)
        title = _table(path)
        if key in self.seen:
            self.out += [f"{'#' * min(depth, 4)} {title}", "", _markdown(doc), ""]
            first = self.seen[key]
            self.out += [f"Same keys as [{_table(first)}](#{_anchor(first)}).", ""]
            return
        self.seen[key] = path
        self.toc.append((depth, path))
        self.out += [f"{'#' * min(depth, 4)} {title}", ""]
        if doc:
            self.out += [_markdown(doc), ""]
        if len(structs) == 1:
            self.fields(path, structs[0], [f.name for f in structs[0].fields], depth)
        else:
            self.variants(path, structs, depth)

    def variants(self, path: str, structs: list[mi.StructType], depth: int) -> None:
        tag_field = structs[0].tag_field
        tags = ", ".join(f"`{_value(s.tag)}`" for s in structs)
        self.out += [f"Variants, chosen by `{path}.{tag_field}`: {tags}.", ""]
        owners: dict[type, list[mi.StructType]] = {}
        for st in structs:
            for f in st.fields:
                owners.setdefault(_owner(st.cls, f.name), [])
                if st not in owners[_owner(st.cls, f.name)]:
                    owners[_owner(st.cls, f.name)].append(st)
        shared = [(o, sts) for o, sts in owners.items() if o not in {s.cls for s in structs}]
        for owner, sts in sorted(shared, key=lambda item: -len(item[1])):
            names = [f.name for f in sts[0].fields if _owner(sts[0].cls, f.name) is owner]
            which = ", ".join(f"`{_value(s.tag)}`" for s in sts)
            every = "every variant" if len(sts) == len(structs) else f"variants {which}"
            self.out += [f"{'#' * min(depth + 1, 4)} Keys of {every}", ""]
            self.fields(path, sts[0], names, depth + 1)
        for st in structs:
            own = [f.name for f in st.fields if _owner(st.cls, f.name) is st.cls]
            head = f"`{tag_field} = {_value(st.tag)}`"
            self.out += [f"{'#' * min(depth + 1, 4)} {head}", ""]
            if st.cls.__doc__:
                self.out += [_markdown(inspect.cleandoc(st.cls.__doc__)), ""]
            if own:
                self.fields(path, st, own, depth + 1)
            else:
                self.out += ["No keys of its own.", ""]

    def fields(self, path: str, st: mi.StructType, names: list[str], depth: int) -> None:
        by_name = {f.name: f for f in st.fields}
        nested: list[tuple[str, list[mi.StructType], str]] = []
        for name in names:
            field = by_name[name]
            dotted = f"{path}.{field.encode_name}" if path else field.encode_name
            doc = _doc(st.cls, name)
            sub = _section_of(field.type)
            if sub is not None:
                structs, how = sub
                dotted += how
                if len(structs) == 1 and structs[0].cls.__doc__:
                    doc = inspect.cleandoc(structs[0].cls.__doc__)
                if field.required:
                    doc += " This section is required."
                elif len(structs) > 1 and how == "" and field.default is not None:
                    doc += f" Unset, it is {_default(field).removeprefix('default ')}."
                nested.append((dotted, structs, doc))
                if depth > 1:  # the root's sections are listed in the contents
                    link = f"[{_table(dotted)}](#{_anchor(dotted)})"
                    self.out += [f"- **`{dotted}`**: a table, see {link}.", ""]
                continue
            _, optional = _strip(field.type)
            kind = _type(field.type) + (", optional" if optional else "")
            lines = _markdown(doc).splitlines() or [""]
            self.out.append(f"- **`{dotted}`** · {kind} · {_default(field)}  ")
            self.out += [f"  {line}" if line else "" for line in lines]
            self.out.append("")
        for dotted, structs, doc in nested:
            self.section(dotted, structs, depth + 1, doc)


def _table(path: str) -> str:
    """How TOML spells the table at ``path``: ``[a.b]``, or ``[[a.b]]`` for a list of tables."""
    if path.endswith("[]"):
        return f"`[[{path[:-2]}]]`"
    return f"`[{path}]`"


def _anchor(path: str) -> str:
    """GitHub's anchor of a heading ``[path]`` in backticks."""
    return re.sub(r"[^a-z0-9_\- ]", "", path.lower()).replace(" ", "-")


def render(schema: type[msgspec.Struct] = RecipeConfig) -> str:
    """docs/recipe.md as the schema says today (``schema``: the root, for tests)."""
    root = mi.type_info(schema)
    assert isinstance(root, mi.StructType)
    writer = _Writer()
    writer.fields("", root, [f.name for f in root.fields], 1)
    body = writer.out
    toc = [
        f"{'  ' * (depth - 2)}- [{_table(path)}](#{_anchor(path)})"
        for depth, path in writer.toc
        if depth <= 3
    ]
    top = [f.encode_name for f in root.fields if _section_of(f.type) is None]
    keys = ", ".join(f"`{k}`" for k in top)
    intro = [_HEADER, "## Contents", "", *toc, "", f"Top-level keys: {keys}.", ""]
    text = "\n".join([*intro, *body]).rstrip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def _iter_paths(text: str) -> Iterator[str]:
    """Every dotted field path a rendered reference documents (for tests)."""
    for line in text.splitlines():
        if match := re.match(r"- \*\*`([^`]+)`\*\*", line):
            yield match.group(1)


def main(argv: list[str] | None = None, write: Callable[[str], Any] = sys.stdout.write) -> int:
    """``reference [--check] [PATH]``: write (or compare) the recipe reference."""
    return generated_doc_main(
        argv, prog="nexrl_async.config.reference", render=render, command=COMMAND, write=write
    )


def generated_doc_main(
    argv: list[str] | None,
    *,
    prog: str,
    render: Callable[[], str],
    command: str,
    write: Callable[[str], Any],
) -> int:
    """The command line of a generated doc page: ``[--check] [PATH]``.

    Without ``PATH`` the page goes to ``write`` (standard output); with it the file is written,
    or with ``--check`` compared, exiting 1 (and naming ``command``) when it is stale.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    parser.add_argument("path", nargs="?", help="file to write (default: standard output)")
    parser.add_argument("--check", action="store_true", help="exit 1 if PATH is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.path is None:
        write(text)
        return 0
    target = Path(args.path)
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != text:
            write(f"{target} is stale: regenerate it with `{command}`\n")
            return 1
        return 0
    target.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
