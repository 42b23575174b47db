"""A resume refuses recipe changes that break the checkpoint's state, and accepts the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.config.loader import dump_recipe, load_recipe
from nexrl_async.core.errors import ConfigError
from nexrl_async.engine.resume import check_resumable

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"


def test_changing_the_group_size_or_the_data_is_refused_with_the_fields() -> None:
    before = load_recipe(RECIPE).config
    after = load_recipe(RECIPE, ["rollout.group_size=4", "data.kwargs.seed=3"]).config
    with pytest.raises(ConfigError, match=r"depends on data, rollout.group_size, which") as info:
        check_resumable(before, after)
    assert info.value.path == "data"


def test_other_changes_are_accepted() -> None:
    before = load_recipe(RECIPE).config
    after = load_recipe(RECIPE, ["run.total_steps=999", "optim.lr=0.01", "rollout.workers=2"])
    check_resumable(before, after.config)


def test_the_saved_resolved_recipe_compares_equal(tmp_path: Path) -> None:
    cfg = load_recipe(RECIPE).config
    saved = tmp_path / "config.toml"
    saved.write_text(dump_recipe(cfg))
    check_resumable(load_recipe(saved).config, cfg)
