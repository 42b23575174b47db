"""docs/recipe.md is generated from the schema and never stale; it names every field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec.inspect as mi
from msgspec import Struct

from nexrl_async.config import reference
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.config.tree import field_map, struct_variants, unwrap

DOC = Path(__file__).parents[3] / "docs" / "recipe.md"


def test_docs_recipe_md_is_up_to_date() -> None:
    current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    assert current == reference.render(), (
        f"docs/recipe.md is stale: regenerate it with `{reference.COMMAND}` "
        "(from the repository root) and commit it"
    )


def _schema_paths(st: mi.StructType, prefix: str, seen: set[type]) -> set[str]:
    """Every dotted leaf path, walked independently of the generator (first visit only)."""
    paths: set[str] = set()
    for name, field in field_map(st).items():
        dotted = f"{prefix}{name}"
        ftype, _ = unwrap(field.type)
        if isinstance(ftype, mi.ListType | mi.DictType):
            item = ftype.item_type if isinstance(ftype, mi.ListType) else ftype.value_type
            if struct_variants(item):
                dotted += "[]" if isinstance(ftype, mi.ListType) else ".<name>"
                ftype = item
        variants = struct_variants(ftype)
        if not variants:
            paths.add(dotted)
            continue
        if all(v.cls in seen for v in variants):
            continue  # documented once, where first reached
        for v in variants:
            seen.add(v.cls)
            paths |= _schema_paths(v, f"{dotted}.", seen)
    return paths


def test_every_schema_field_is_documented_with_its_docstring() -> None:
    root = mi.type_info(RecipeConfig)
    assert isinstance(root, mi.StructType)
    expected = _schema_paths(root, "", set())
    documented = set(reference._iter_paths(reference.render()))
    assert expected - documented == set()
    assert "inference.urls" in documented  # a variant's own key
    assert "inference.api_key" in documented  # a key every variant shares
    text = reference.render()
    # the docstring under the field, reST markup turned into Markdown
    assert "Samples per data item (the GRPO group)." in text
    assert "`sync` is on-policy" in text
    assert "``" not in text
    # every variant of a tagged union, chosen by its tag
    assert 'Variants, chosen by `inference.backend`: `"local"`, `"sglang"`' in text
    assert "- **`rollout.evaluator`** · reference (`file.py:Name`" in text
    assert "- **`model.path`** · path · **required**" in text


def test_check_flags_a_stale_file_and_names_the_command(tmp_path: Path) -> None:
    target = tmp_path / "recipe.md"
    said: list[str] = []
    assert reference.main(["--check", str(target)], write=said.append) == 1
    assert reference.COMMAND in said[0]
    assert reference.main([str(target)]) == 0
    assert target.read_text(encoding="utf-8") == reference.render()
    assert reference.main(["--check", str(target)], write=said.append) == 0
    target.write_text(reference.render().replace("Samples per data item", "Samples"))
    assert reference.main(["--check", str(target)], write=said.append) == 1


def test_the_module_runs_as_the_documented_command(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nexrl_async.config.reference", str(tmp_path / "r.md")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == ""
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == reference.render()


class _Leaf(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    weight: float = 1.0
    """Share of the mixture."""


class _File(_Leaf, frozen=True, kw_only=True, tag="file"):
    """Rows from a file."""

    path: str
    """Where the rows are."""


class _Gen(_Leaf, frozen=True, kw_only=True, tag="gen"):
    """Rows made up."""

    count: int = 3
    """How many."""


class _Root(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sources: list[_File | _Gen] = []
    """Where data comes from."""
    named: dict[str, _File] = {}
    """Files by name."""


def test_lists_and_tables_of_sections_are_documented() -> None:
    text = reference.render(_Root)
    assert "## `[[sources]]`" in text
    assert "Variants, chosen by `sources[].kind`" in text
    assert "- **`sources[].weight`** · float · default `1.0`" in text
    assert "- **`sources[].path`** · string · **required**" in text
    assert "- **`named.<name>.path`**" in text
    assert set(reference._iter_paths(text)) == {
        "sources[].weight", "sources[].path", "sources[].count", "named.<name>.weight",
        "named.<name>.path",
    }  # fmt: skip
