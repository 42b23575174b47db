"""A short real run of an RL variant recipe: local server subprocess, tiny model, reverse-digits.

The rollout reward must rise within a few dozen steps (mean of the first five steps against the
last five), so a regression that stops the engine from learning fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexrl_async.config.loader import load_recipe
from nexrl_async.engine.run import run_recipe

RECIPES = Path(__file__).parents[3] / "recipes" / "reverse_digits"
STEPS = 40
FAST = [
    f"run.total_steps={STEPS}",
    "logging.progress=false",
    "logging.samples_every_steps=0",
    "validation.before_training=false",
    "validation.every_steps=0",
    "validation.at_end=false",
    "checkpoint.every_steps=0",
    "checkpoint.at_end=false",
    "checkpoint.export_hf=false",
    # The demo's strong entropy bonus (0.2) keeps sampling broad, so the sampled reward climbs
    # slowly in the first 40 steps; a small one shows the estimator learning within them.
    "algorithm.entropy_coef=0.01",
]


def rewards(run_dir: Path) -> list[float]:
    """``rollout/reward_mean`` of every step, in step order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = sorted(
        (r["step"], r["rollout/reward_mean"]) for r in rows if "rollout/reward_mean" in r
    )
    return [value for _, value in steps]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_rloo_reward_rises(tmp_path: Path) -> None:
    loaded = load_recipe(RECIPES / "rloo.toml", FAST)
    assert run_recipe(loaded, output=tmp_path / "run") == "completed"
    values = rewards(tmp_path / "run")
    assert len(values) == STEPS
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last > first + 0.05, (first, last, values)
