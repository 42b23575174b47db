"""The shipped mixture recipe runs end to end and reports every source in its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexrl_async.config.loader import load_recipe
from nexrl_async.engine.run import run_recipe

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "mixture.toml"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_a_mixture_run_reports_each_source(tmp_path: Path) -> None:
    steps, groups = 3, 8
    overrides = [
        f"run.total_steps={steps}",
        "rollout.workers=4",
        "rollout.group_size=4",
        f"pool.batch_groups={groups}",
        "logging.progress=false",
        "validation.every_steps=0",
        "validation.before_training=false",
        "checkpoint.every_steps=0",
    ]
    out = tmp_path / "run"
    assert run_recipe(load_recipe(RECIPE, overrides), output=out) == "completed"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "train/loss" in m]
    assert len(train) == steps
    for m in train:
        per_source = [m.get(f"data/{name}/groups", 0.0) for name in ("two", "three")]
        assert sum(per_source) == groups  # every group of the batch is counted once
        for name in ("two", "three"):
            if m.get(f"data/{name}/groups"):
                assert 0.0 <= m[f"data/{name}/reward_mean"] <= 1.0
                assert m[f"data/{name}/samples"] == 4 * m[f"data/{name}/groups"]
    last = train[-1]
    drawn = last["data/two/drawn"] + last["data/three/drawn"]
    assert drawn == last["data/draws"] >= steps * groups
    assert last["data/two/drawn"] > last["data/three/drawn"]  # weights 3:1
    final = lines[-1]
    assert final["val/two/samples"] == 48
    assert final["val/three/samples"] == 16
    assert 0.0 <= final["val/three/reward_mean"] <= 1.0
    admitted = [
        json.loads(line)["item_key"]
        for line in (out / "events.jsonl").read_text().splitlines()
        if '"admitted"' in line
    ]
    assert {key.split("/")[0] for key in admitted} == {"two", "three"}
