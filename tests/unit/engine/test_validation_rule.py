"""``validation.failed_samples``: a failed sample scores 0 in the means, or is left out; and how
many validation groups run at once."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from nexrl_async.config.loader import load_recipe
from nexrl_async.core.records import FailureReason, Group, Status, Trajectory, Turn, VersionToken
from nexrl_async.engine.validator import summarize, validation_concurrency

TOKEN = VersionToken(lease_id=0, version=0)


def sample(index: int, reward: float, *, failed: bool = False) -> Trajectory:
    return Trajectory(
        group_id="v", item_key="k", sample_index=index, token=TOKEN,
        turns=[Turn(role="assistant", token_ids=[1], loss_mask=[1])], reward=reward,
        metrics={} if failed else {"exact": reward},
        status=Status.FAILED if failed else Status.OK,
        failure=FailureReason.TIMEOUT if failed else None,
    )  # fmt: skip


GROUPS = [
    Group(
        group_id="v", item_key="k", token=TOKEN,
        trajectories=[sample(0, 1.0), sample(1, 1.0), sample(2, 0.0, failed=True)],
    )
]  # fmt: skip


def test_failed_samples_score_zero_by_default() -> None:
    out = summarize(GROUPS)
    assert out["val/failed"] == 1.0
    assert math.isclose(out["val/reward_mean"], 2 / 3)
    assert math.isclose(out["val/exact_mean"], 2 / 3)


def test_exclude_averages_the_samples_that_succeeded() -> None:
    out = summarize(GROUPS, failed_samples="exclude")
    assert out["val/failed"] == 1.0
    assert out["val/reward_mean"] == 1.0
    assert out["val/exact_mean"] == 1.0


def test_validation_keeps_as_many_samples_in_flight_as_training() -> None:
    recipes = Path(__file__).parents[3] / "recipes"
    cfg = load_recipe(recipes / "reverse_digits" / "recipe.toml").config
    assert validation_concurrency(cfg) == 32 * 8  # the demo's 64 items: one wave, not two
    wide = msgspec.structs.replace(cfg.validation, group_size=16)
    assert validation_concurrency(msgspec.structs.replace(cfg, validation=wide)) == 16
    big = msgspec.structs.replace(cfg.validation, group_size=1024)
    assert validation_concurrency(msgspec.structs.replace(cfg, validation=big)) == 1
