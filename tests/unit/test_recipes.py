"""Every shipped recipe passes ``nexrl-async check``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.cli import main

RECIPES = sorted((Path(__file__).parents[2] / "recipes").rglob("*.toml"))


def test_recipes_exist() -> None:
    assert RECIPES, "no recipes shipped"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_passes_check(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", str(recipe)])
    assert info.value.code == 0, capsys.readouterr().err
