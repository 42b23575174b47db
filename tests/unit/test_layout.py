"""House rules checked mechanically: module size, package docstrings, documented config fields."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest

import nexrl_async
from nexrl_async.config import schema

SRC = Path(nexrl_async.__file__).parent
MAX_LINES = 400


def test_no_module_exceeds_the_line_ceiling() -> None:
    too_long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_no_two_modules_share_a_basename() -> None:
    """A module's name says what it does; two rooms never hold two different ``x.py``."""
    seen: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            seen.setdefault(path.name, []).append(str(path.relative_to(SRC)))
    repeated = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not repeated, f"repeated module names: {repeated}"


def test_every_design_reference_names_a_file_in_the_repository() -> None:
    root = SRC.parents[1]
    cited = re.compile(r"(?:docs/)?[A-Za-z_]+\.md\b")
    missing = set()
    for folder in ("src", "tests", "benchmarks", "recipes"):
        for path in (root / folder).rglob("*.py"):
            for ref in cited.findall(path.read_text()):
                outside = ref.split(".")[0].isupper()  # upper-case notes live elsewhere
                if outside or ("/" in ref and not (root / ref).exists()):
                    missing.add(f"{path.relative_to(root)}: {ref}")
    assert not missing, sorted(missing)


def test_every_subpackage_says_what_it_owns_and_must_not_import() -> None:
    for init in SRC.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if init.parent == SRC:
            assert doc, "the package needs a docstring"
            continue
        assert "Owns" in doc, f"{init} docstring lacks what it owns"
        assert "Must not import" in doc, f"{init} docstring lacks what it must not import"


def _config_structs() -> list[type[msgspec.Struct]]:
    """Every Struct reachable from the recipe root."""
    found: dict[type, None] = {}

    def visit(t: mi.Type) -> None:
        if isinstance(t, mi.StructType):
            if t.cls in found:
                return
            found[t.cls] = None
            for f in t.fields:
                visit(f.type)
        elif isinstance(t, mi.Metadata):
            visit(t.type)
        elif isinstance(t, mi.UnionType):
            for sub in t.types:
                visit(sub)
        elif isinstance(t, mi.ListType | mi.DictType):
            visit(t.item_type if isinstance(t, mi.ListType) else t.value_type)

    visit(mi.type_info(schema.RecipeConfig))
    return list(found)


def _field_docs(cls: type) -> set[str]:
    source = Path(importlib.import_module(cls.__module__).__file__ or "").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            body = node.body
            return {
                stmt.target.id
                for stmt, nxt in zip(body, [*body[1:], None], strict=True)
                if isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            }
    return set()


@pytest.mark.parametrize("cls", _config_structs(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls: type[msgspec.Struct]) -> None:
    for klass in cls.__mro__:
        if klass is msgspec.Struct or not issubclass(klass, msgspec.Struct):
            continue
        own = set(inspect.get_annotations(klass))
        missing = own - _field_docs(klass)
        assert not missing, f"{klass.__name__} fields without a docstring: {sorted(missing)}"


def test_config_structs_are_frozen_and_strict() -> None:
    for cls in _config_structs():
        cfg = cls.__struct_config__
        assert cfg.frozen, cls.__name__
        assert cfg.forbid_unknown_fields, cls.__name__
    assert schema.RecipeConfig in _config_structs()


def test_config_imports_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, nexrl_async.config.loader, nexrl_async.config.preflight, nexrl_async.cli;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
