"""Short real runs of the engine: local server subprocess, tiny model, reverse-digits task."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nexrl_async.config.loader import load_recipe
from nexrl_async.engine.run import run_recipe

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"

SMALL = [
    "run.total_steps=3",
    "rollout.workers=4",
    "rollout.group_size=4",
    "pool.batch_groups=4",
    "logging.progress=false",
    "validation.every_steps=0",
    "validation.before_training=false",
    "validation.at_end=false",
    "checkpoint.every_steps=0",
    "trainer.process=false",
]

Runner = Callable[..., Path]


@pytest.fixture
def run_small(tmp_path: Path) -> Runner:
    """Run the reverse-digits recipe (or ``recipe``) with small settings; return the run dir."""

    def _run(*overrides: str, recipe: Path = RECIPE, name: str = "run") -> Path:
        out = tmp_path / name
        reason = run_recipe(load_recipe(recipe, [*SMALL, *overrides]), output=out)
        assert reason == "completed"
        return out

    return _run
