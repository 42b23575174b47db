"""Grouping keys: groups whose items agree on ``pool.group_by`` share one advantage baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nexrl_async.algorithms.advantages import group_advantages
from nexrl_async.config.loader import load_recipe
from nexrl_async.config.pipeline import PoolConfig, StalenessConfig
from nexrl_async.core.errors import ConfigError
from nexrl_async.core.records import Group, Trajectory, Turn, VersionToken
from nexrl_async.pipeline.grouping import baseline_key, cluster_by_key
from nexrl_async.pipeline.pool import TrajectoryPool
from nexrl_async.pipeline.staleness import StalenessGate
from nexrl_async.train.tensors import sequences_from_batch


def group(token: VersionToken, rewards: list[float]) -> Group:
    trajectories = [
        Trajectory(
            group_id=f"g{token.lease_id}",
            item_key=f"0:{token.lease_id}",
            sample_index=i,
            token=token,
            turns=[Turn(role="assistant", token_ids=[3, 4], loss_mask=[1, 1])],
            reward=reward,
        )
        for i, reward in enumerate(rewards)
    ]
    return Group(
        group_id=f"g{token.lease_id}",
        item_key=f"0:{token.lease_id}",
        token=token,
        trajectories=trajectories,
    )


def test_the_key_is_canonical_json_of_the_named_fields() -> None:
    a = baseline_key({"task": {"x": 1, "y": [2, 3]}, "user": "u1", "noise": 5}, ["user", "task"])
    b = baseline_key({"noise": 6, "task": {"y": [2, 3], "x": 1}, "user": "u1"}, ["user", "task"])
    assert a == b == '["u1",{"x":1,"y":[2,3]}]'
    assert baseline_key({"user": "u1"}, ["user", "task"]) is None  # a missing field
    assert baseline_key({"t": object()}, ["t"]) is None  # not JSON


def test_cluster_by_key_takes_whole_key_groups_within_the_last_tier() -> None:
    # (tier, key, id), sorted by tier: earlier tiers are always taken whole
    entries = [(0, "a", 0), (1, "b", 1), (1, "c", 2), (1, "a", 3), (1, "b", 4), (2, "a", 5)]

    def pick(count: int) -> list[int]:
        chosen = cluster_by_key(entries, count, tier=lambda e: e[0], key=lambda e: e[1])
        return [e[2] for e in chosen]

    assert pick(3) == [0, 3, 1]  # "a" already in the step comes first, then the oldest key
    assert pick(4) == [0, 3, 1, 4]  # "b" whole
    assert pick(5) == [0, 3, 1, 4, 2]
    assert pick(6) == [0, 1, 2, 3, 4, 5]  # the last tier is tier 2 now: tier 1 goes whole
    assert pick(7) == [0, 1, 2, 3, 4, 5]  # not enough: everything, in order


def build(group_by: list[str], batch: int) -> tuple[StalenessGate, TrajectoryPool]:
    gate = StalenessGate(StalenessConfig(mode="batch-async", max_staleness=1), batch_groups=batch)
    cfg = PoolConfig(batch_groups=batch, group_by=group_by)
    return gate, TrajectoryPool(cfg, gate=gate)


def lease(gate: StalenessGate, n: int) -> list[VersionToken]:
    tokens = [gate.try_lease() for _ in range(n)]
    assert all(t is not None for t in tokens)
    return [t for t in tokens if t is not None]


def test_the_pool_trains_items_of_one_task_together_with_one_baseline() -> None:
    gate, pool = build(["task_id"], batch=2)
    tokens = lease(gate, 4)
    tasks: list[dict[str, Any]] = [{"task_id": t} for t in ("t1", "t2", "t1", "t2")]
    rewards = [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    for token, fields, r in zip(tokens, tasks, rewards, strict=True):
        pool.put(group(token, r), fields)
    batch = pool.take_batch(0).batch
    assert batch is not None
    # leases 0 and 2 (task t1) go together although lease 1 is older than lease 2
    assert [g.group_id for g in batch.groups] == ["g0", "g2"]
    assert {g.baseline_key for g in batch.groups} == {'["t1"]'}
    seq = sequences_from_batch(batch, pad_token_id=0)
    assert seq.group_index.tolist() == [0, 0, 0, 0]
    advantages = group_advantages(seq.rewards, seq.group_index, estimator="dr_grpo")
    assert torch.allclose(advantages, torch.tensor([0.5, 0.5, -0.5, -0.5]))
    nxt = pool.take_batch(1).batch
    assert nxt is not None
    assert [g.group_id for g in nxt.groups] == ["g1", "g3"]


def test_without_group_by_each_item_is_its_own_group() -> None:
    gate, pool = build([], batch=2)
    tokens = lease(gate, 2)
    for token in tokens:
        pool.put(group(token, [0.0, 1.0]), {"task_id": "same"})
    batch = pool.take_batch(0).batch
    assert batch is not None
    assert [g.baseline_key for g in batch.groups] == [None, None]
    assert sequences_from_batch(batch, pad_token_id=0).group_index.tolist() == [0, 0, 1, 1]


def test_an_item_without_the_field_keeps_its_own_group() -> None:
    gate, pool = build(["task_id"], batch=2)
    a, b = lease(gate, 2)
    pool.put(group(a, [0.0, 1.0]), {"other": 1})
    pool.put(group(b, [0.0, 1.0]), {"other": 1})
    batch = pool.take_batch(0).batch
    assert batch is not None
    assert sequences_from_batch(batch, pad_token_id=0).group_index.tolist() == [0, 0, 1, 1]


def test_group_by_deadline_order_still_comes_first() -> None:
    gate, pool = build(["task_id"], batch=2)
    first = lease(gate, 4)  # version 0
    for token, task in zip(first, ("t1", "t2", "t3", "t1"), strict=True):
        pool.put(group(token, [0.0, 1.0]), {"task_id": task})
    step0 = pool.take_batch(0).batch
    assert step0 is not None
    assert [g.group_id for g in step0.groups] == ["g0", "g3"]
    gate.advance(1)
    (late,) = lease(gate, 1)  # version 1, the key of g1
    pool.put(group(late, [0.0, 1.0]), {"task_id": "t2"})
    step1 = pool.take_batch(1).batch
    assert step1 is not None
    assert [g.group_id for g in step1.groups] == ["g1", "g2"]  # the older lease version wins


RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "recipe.toml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('pool.group_by=["task", "task"]', "appears twice"),
        ('pool.group_by=[""]', "is empty"),
        ("pool.min_group_size=9", "more than rollout.group_size = 4"),
    ],
)
def test_recipe_checks(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe(RECIPE, ["rollout.group_size=4", override])
    assert info.value.path in ("pool.group_by", "pool.min_group_size")


def test_a_group_size_of_one_accepts_the_default_min_group_size() -> None:
    loaded = load_recipe(RECIPE, ["rollout.group_size=1", 'algorithm.estimator="reinforce_pp"'])
    assert loaded.config.pool.min_group_size == 2
