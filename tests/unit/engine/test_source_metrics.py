"""Per-source metrics: ``data/<source>/...`` of a trained batch, ``val/<source>/...``."""

from __future__ import annotations

import pytest

from nexrl_async.core.records import (
    FailureReason,
    Group,
    Status,
    TrainBatch,
    Trajectory,
    Turn,
    VersionToken,
)
from nexrl_async.engine.stats import batch_metrics
from nexrl_async.engine.validator import summarize


def group(key: str, rewards: list[float], lease: int, failed: int = -1) -> Group:
    token = VersionToken(lease_id=lease, version=0)
    trajs = [
        Trajectory(
            group_id=f"g{lease}",
            item_key=key,
            sample_index=i,
            token=token,
            turns=[Turn(role="assistant", token_ids=[1], loss_mask=[1])],
            reward=r,
            metrics={"exact": float(r == 1.0)},
            status=Status.FAILED if i == failed else Status.OK,
            failure=FailureReason.TIMEOUT if i == failed else None,
        )
        for i, r in enumerate(rewards)
    ]
    return Group(group_id=f"g{lease}", item_key=key, token=token, trajectories=trajs)


def test_a_batch_reports_groups_samples_and_reward_per_source() -> None:
    batch = TrainBatch(
        step=0,
        groups=[
            group("easy/0:3", [1.0, 0.0], 0),
            group("easy/1:0", [1.0, 1.0], 1),
            group("hard/0:7", [0.0, 0.5], 2),
        ],
    )
    metrics = batch_metrics(batch)
    assert metrics["data/easy/groups"] == 2
    assert metrics["data/hard/groups"] == 1
    assert metrics["data/easy/samples"] == 4
    assert metrics["data/hard/samples"] == 2
    assert metrics["data/easy/reward_mean"] == pytest.approx(0.75)
    assert metrics["data/hard/reward_mean"] == pytest.approx(0.25)
    assert metrics["rollout/reward_mean"] == pytest.approx(3.5 / 6)


def test_unnamed_sources_add_no_data_metrics() -> None:
    batch = TrainBatch(step=0, groups=[group("0:3", [1.0, 0.0], 0)])
    assert not [k for k in batch_metrics(batch) if k.startswith("data/")]


def test_validation_is_summarised_per_source_too() -> None:
    groups = [
        group("easy/0:0", [1.0], 0),
        group("easy/0:1", [0.0], 1),
        group("hard/0:0", [1.0, 0.5], 2, failed=1),
    ]
    out = summarize(groups)
    assert out["val/reward_mean"] == pytest.approx(2.0 / 4)
    assert out["val/easy/reward_mean"] == pytest.approx(0.5)
    assert out["val/hard/reward_mean"] == pytest.approx(0.5)  # the failed sample scores 0
    assert out["val/hard/failed"] == 1
    assert out["val/easy/samples"] == 2
    assert out["val/easy/exact_mean"] == pytest.approx(0.5)
    excluded = summarize(groups, failed_samples="exclude")
    assert excluded["val/hard/reward_mean"] == pytest.approx(1.0)
