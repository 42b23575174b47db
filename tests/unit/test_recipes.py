"""Every shipped recipe passes ``nexrl-async check``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nexrl_async.cli import main

VLLM_MISSING = 'inference.backend = "vllm": vllm is not installed for inference.python'
RECIPES = sorted((Path(__file__).parents[2] / "recipes").rglob("*.toml"))


def test_recipes_exist() -> None:
    assert RECIPES, "no recipes shipped"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_passes_check(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", str(recipe)])
    err = capsys.readouterr().err
    if info.value.code == 2 and VLLM_MISSING in err and "NEXRL_VLLM_PYTHON" not in os.environ:
        pytest.skip("no vLLM environment here (nox -s vllm_env): check refuses it, as run would")
    assert info.value.code == 0, err
