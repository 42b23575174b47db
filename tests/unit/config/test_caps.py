"""Absurd sizes are rejected up front, naming the field, instead of exhausting memory later."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.config.loader import load_recipe
from nexrl_async.core.errors import ConfigError

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("rollout.workers=9223372036854775807", "rollout.workers"),
        ("pool.batch_groups=1000000000000", "pool.batch_groups"),
        ("pool.capacity_groups=100000000", "pool.capacity_groups"),
        ("rollout.group_size=100000", "rollout.group_size"),
        ("rollout.max_new_tokens=10000000000", "rollout.max_new_tokens"),
        ("staleness.max_inflight_groups=100000000", "staleness.max_inflight_groups"),
    ],
)
def test_absurd_sizes_are_refused_with_the_field_path(override: str, path: str) -> None:
    with pytest.raises(ConfigError, match=rf"{path} = \d+: expected int <= \d+"):
        load_recipe(RECIPE, [override])
