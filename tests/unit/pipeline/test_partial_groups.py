"""Partial groups: failed samples leave (or zero) their group, which trains on what remains."""

from __future__ import annotations

import msgspec
import pytest
import torch

from nexrl_async.algorithms.advantages import group_advantages
from nexrl_async.config.pipeline import FailedSamples, PoolConfig, StalenessConfig
from nexrl_async.core.records import (
    FailureReason,
    Group,
    Status,
    Trajectory,
    Turn,
    VersionToken,
)
from nexrl_async.pipeline.partial_groups import settle_failures
from nexrl_async.pipeline.pool import GroupFailed, GroupPooled, TrajectoryPool
from nexrl_async.pipeline.staleness import StalenessGate
from nexrl_async.train.tensors import sequences_from_batch

OK = None
EVAL = FailureReason.EVALUATOR_ERROR
TIMEOUT = FailureReason.TIMEOUT


def group(token: VersionToken, outcomes: list[tuple[float, FailureReason | None]]) -> Group:
    """A group whose sample ``i`` has reward ``outcomes[i][0]`` and fails with the reason
    ``outcomes[i][1]`` (``None``: scored)."""
    trajectories = [
        Trajectory(
            group_id=f"g{token.lease_id}",
            item_key=f"0:{token.lease_id}",
            sample_index=i,
            token=token,
            turns=[Turn(role="assistant", token_ids=[3, 4, 5], loss_mask=[1, 1, 1])],
            reward=reward,
            status=Status.OK if failure is None else Status.FAILED,
            failure=failure,
        )
        for i, (reward, failure) in enumerate(outcomes)
    ]
    return Group(
        group_id=f"g{token.lease_id}",
        item_key=f"0:{token.lease_id}",
        token=token,
        trajectories=trajectories,
    )


def build(
    policy: FailedSamples = "drop_sample", min_group_size: int = 2, batch: int = 1
) -> tuple[StalenessGate, TrajectoryPool]:
    gate = StalenessGate(StalenessConfig(mode="sync"), batch_groups=batch)
    cfg = PoolConfig(batch_groups=batch, failed_samples=policy, min_group_size=min_group_size)
    return gate, TrajectoryPool(cfg, gate=gate)


def lease(gate: StalenessGate) -> VersionToken:
    token = gate.try_lease()
    assert token is not None
    return token


def test_drop_sample_is_the_default_and_trains_what_remains() -> None:
    assert PoolConfig().failed_samples == "drop_sample"
    gate, pool = build()
    token = lease(gate)
    events = pool.put(group(token, [(1.0, OK), (0.0, TIMEOUT), (0.0, OK), (0.0, EVAL)]))
    (pooled,) = events
    assert isinstance(pooled, GroupPooled)
    assert pooled.samples == 2
    assert pooled.dropped == ["timeout", "evaluator_error"]
    assert pooled.zeroed == []
    assert not pooled.degraded
    batch = pool.take_batch(0).batch
    assert batch is not None
    (kept,) = batch.groups
    assert [t.sample_index for t in kept.trajectories] == [0, 2]
    assert all(t.ok for t in kept.trajectories)
    metrics = pool.metrics()
    assert metrics["pool/partial_groups"] == 1.0
    assert metrics["pool/dropped_samples"] == 2.0
    assert metrics["pool/failed_groups"] == 0.0


def test_the_baseline_is_over_the_samples_that_remain() -> None:
    gate, pool = build()
    token = lease(gate)
    pool.put(group(token, [(1.0, OK), (0.0, OK), (0.5, TIMEOUT), (1.0, OK)]))
    batch = pool.take_batch(0).batch
    assert batch is not None
    seq = sequences_from_batch(batch, pad_token_id=0)
    assert seq.size == 3
    advantages = group_advantages(seq.rewards, seq.group_index, estimator="dr_grpo")
    expected = torch.tensor([1.0, 0.0, 1.0]) - 2.0 / 3.0
    assert torch.allclose(advantages, expected)


def test_too_few_samples_left_fails_the_group_with_every_reason() -> None:
    gate, pool = build(min_group_size=3)
    token = lease(gate)
    (event,) = pool.put(group(token, [(1.0, OK), (0.0, TIMEOUT), (0.0, OK), (0.0, EVAL)]))
    assert isinstance(event, GroupFailed)
    assert event.replay
    assert event.reasons == ["evaluator_error", "timeout"]
    assert gate.current(token.lease_id) is None  # the lease is released
    assert pool.size == 0
    assert pool.counters.failed_groups == 1
    assert pool.counters.dropped_samples == 0


def test_min_group_size_is_capped_at_the_group_size() -> None:
    gate, pool = build(min_group_size=8)
    token = lease(gate)
    (event,) = pool.put(group(token, [(1.0, OK), (0.0, OK)]))  # no failure: always kept
    assert isinstance(event, GroupPooled)
    single = settle_failures(group(token, [(0.0, TIMEOUT)]), "drop_sample", 2)
    assert single.group is None  # a group of one that failed has nothing left


def test_drop_group_discards_the_group_for_one_failed_sample() -> None:
    gate, pool = build("drop_group")
    token = lease(gate)
    (event,) = pool.put(group(token, [(1.0, OK), (0.0, OK), (0.0, OK), (0.0, EVAL)]))
    assert isinstance(event, GroupFailed)
    assert event.reasons == ["evaluator_error"]


def test_zero_reward_keeps_scoring_failures_and_drops_the_rest() -> None:
    gate, pool = build("zero_reward")
    token = lease(gate)
    (pooled,) = pool.put(group(token, [(1.0, OK), (1.0, EVAL), (1.0, TIMEOUT), (1.0, OK)]))
    assert isinstance(pooled, GroupPooled)
    assert pooled.samples == 3
    assert pooled.zeroed == ["evaluator_error"]
    assert pooled.dropped == ["timeout"]
    assert not pooled.degraded
    batch = pool.take_batch(0).batch
    assert batch is not None
    zeroed = batch.groups[0].trajectories[1]
    assert zeroed.ok
    assert zeroed.reward == 0.0
    assert zeroed.failure is None
    assert zeroed.failure_detail.startswith("zero_reward after evaluator_error")
    assert [t.reward for t in batch.groups[0].trajectories] == [1.0, 0.0, 1.0]
    assert pool.counters.zeroed_samples == 1
    assert pool.counters.dropped_samples == 1


def test_a_group_trained_mostly_on_zeroed_samples_is_degraded() -> None:
    gate, pool = build("zero_reward")
    token = lease(gate)
    outcomes = [(0.0, EVAL), (0.0, FailureReason.INVALID_REWARD), (1.0, OK)]
    (pooled,) = pool.put(group(token, outcomes))
    assert isinstance(pooled, GroupPooled)
    assert pooled.samples == 3
    assert pooled.degraded  # one real score, min_group_size 2: the breaker counts it failed


def test_zero_variance_is_judged_on_what_remains() -> None:
    gate = StalenessGate(StalenessConfig(mode="sync"), batch_groups=1)
    pool = TrajectoryPool(PoolConfig(batch_groups=1, filter_zero_variance=True), gate=gate)
    token = lease(gate)
    (event,) = pool.put(group(token, [(1.0, OK), (0.0, TIMEOUT), (1.0, OK)]))
    assert type(event).__name__ == "GroupFiltered"


def test_counters_survive_a_checkpoint() -> None:
    gate, pool = build()
    token = lease(gate)
    pool.put(group(token, [(1.0, OK), (0.0, TIMEOUT), (0.0, OK)]))
    state = msgspec.json.decode(msgspec.json.encode(pool.state_dict()))
    gate_state = gate.state_dict()
    gate2 = StalenessGate(StalenessConfig(mode="sync"), batch_groups=1)
    gate2.load_state_dict(gate_state)
    restored = TrajectoryPool(PoolConfig(batch_groups=1), gate=gate2)
    restored.load_state_dict(state)
    assert restored.counters.dropped_samples == 1
    batch = restored.take_batch(0).batch
    assert batch is not None
    assert len(batch.groups[0].trajectories) == 2


@pytest.mark.parametrize("policy", ["drop_sample", "zero_reward", "drop_group"])
def test_a_clean_group_is_untouched(policy: FailedSamples) -> None:
    token = VersionToken(lease_id=0, version=0)
    clean = group(token, [(1.0, OK), (0.0, OK)])
    settled = settle_failures(clean, policy, 2)
    assert settled.group is clean
    assert settled.scored == 2
