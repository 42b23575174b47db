"""Servers the engine launches require a random API key unless the recipe sets one."""

from __future__ import annotations

from pathlib import Path

import msgspec

from nexrl_async.config.inference import AttachInference, LocalInference, NoInference
from nexrl_async.config.loader import load_recipe
from nexrl_async.engine.context import launch_key, open_run

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "reverse_digits" / "recipe.toml"


def test_launched_servers_get_a_fresh_random_key() -> None:
    first, second = launch_key(LocalInference()), launch_key(LocalInference())
    assert first.api_key is not None
    assert len(first.api_key) >= 32
    assert first.api_key != second.api_key
    keys = [launch_key(LocalInference()).api_key or "" for _ in range(200)]
    assert not [key for key in keys if key.startswith("-")], "a key must not read as an option"
    assert msgspec.structs.replace(first, api_key=None) == LocalInference()


def test_a_configured_key_attached_and_absent_servers_are_left_alone() -> None:
    assert launch_key(LocalInference(api_key="mine")).api_key == "mine"
    attached = AttachInference(urls=["http://127.0.0.1:30000"])
    assert launch_key(attached) is attached
    assert launch_key(NoInference()).api_key is None


def test_the_run_uses_the_key_but_never_writes_it(tmp_path: Path) -> None:
    ctx = open_run(load_recipe(RECIPE), tmp_path / "run", resume=False)
    try:
        key = ctx.cfg.inference.api_key
        assert key is not None
        assert key not in ctx.run_dir.config_path.read_text(encoding="utf-8")
    finally:
        ctx.close()
