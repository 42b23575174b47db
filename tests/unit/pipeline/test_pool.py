from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from nexrl_async.config.pipeline import PoolConfig, StalenessConfig
from nexrl_async.core.errors import CheckpointError, ConfigError
from nexrl_async.core.records import Group, VersionToken
from nexrl_async.pipeline.pool import (
    GroupDropped,
    GroupFailed,
    GroupFiltered,
    GroupPooled,
    GroupRequeued,
    LeaseOverdue,
    PoolEvent,
    StepWaiting,
    TrajectoryPool,
)
from nexrl_async.pipeline.staleness import StalenessGate

GroupFactory = Callable[..., Group]


def build(
    batch: int = 2,
    *,
    capacity: int | None = None,
    filter_zero_variance: bool = False,
    **staleness: object,
) -> tuple[StalenessGate, TrajectoryPool]:
    st = msgspec.convert(staleness, StalenessConfig)
    gate = StalenessGate(st, batch_groups=batch)
    cfg = PoolConfig(
        batch_groups=batch, capacity_groups=capacity, filter_zero_variance=filter_zero_variance
    )
    return gate, TrajectoryPool(cfg, gate=gate)


def lease(gate: StalenessGate, n: int) -> list[VersionToken]:
    tokens = [gate.try_lease() for _ in range(n)]
    assert all(t is not None for t in tokens), "admission refused a lease the test needs"
    return [t for t in tokens if t is not None]


def kinds(events: list[PoolEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


def test_capacity_defaults_to_two_batches_and_must_hold_one() -> None:
    assert build(3)[1].capacity == 6
    with pytest.raises(ConfigError, match="capacity_groups"):
        build(3, capacity=2)
    gate = StalenessGate(StalenessConfig(), batch_groups=2)
    with pytest.raises(ConfigError, match="batch_groups"):
        TrajectoryPool(PoolConfig(batch_groups=3), gate=gate)


def test_batch_is_ready_at_batch_groups_oldest_version_first(make_group: GroupFactory) -> None:
    gate, pool = build(2, mode="batch-async", max_staleness=2)
    v0 = lease(gate, 2)
    assert pool.take_batch(0).batch is None
    events = pool.put(make_group(v0[1]))
    assert kinds(events) == ["GroupPooled"]
    assert isinstance(events[0], GroupPooled)
    assert events[0].pool_size == 1
    assert pool.take_batch(0).batch is None  # one group short
    pool.put(make_group(v0[0]))
    out = pool.take_batch(0)
    assert out.batch is not None
    assert out.batch.step == 0
    assert [g.token.lease_id for g in out.batch.groups] == [0, 1]
    assert pool.size == 0
    assert pool.next_step == 1
    assert gate.counters.redeemed == 2
    # Next: a version-1 group arrives before the remaining version-0 ones; v0 goes first.
    v0b = lease(gate, 4)
    gate.advance(1)
    (v1,) = lease(gate, 1)
    for tok in [v1, *v0b[1:]]:
        pool.put(make_group(tok))
    out = pool.take_batch(1)
    assert out.batch is not None
    assert [g.token.lease_id for g in out.batch.groups] == [v0b[1].lease_id, v0b[2].lease_id]


def test_ties_in_lease_version_go_to_the_older_head(make_group: GroupFactory) -> None:
    gate, pool = build(1, mode="fully-async", max_inflight_groups=4)
    a, b = lease(gate, 2)
    pool.put(make_group(a, head=3))
    pool.put(make_group(b, head=1))
    out = pool.take_batch(0)
    assert out.batch is not None
    assert out.batch.groups[0].token == b


def test_take_batch_wants_the_next_step(make_group: GroupFactory) -> None:
    _, pool = build(2)
    with pytest.raises(ValueError, match="next step is 0"):
        pool.take_batch(1)


def test_backpressure_when_full(make_group: GroupFactory) -> None:
    gate, pool = build(1, capacity=2, mode="fully-async", max_inflight_groups=5)
    tokens = lease(gate, 4)
    pool.put(make_group(tokens[0]))
    pool.put(make_group(tokens[1]))
    assert not pool.can_put()
    assert not pool.can_put(make_group(tokens[2]))
    with pytest.raises(OverflowError, match="full"):
        pool.put(make_group(tokens[2]))
    assert gate.current(tokens[2].lease_id) == tokens[2]  # a refused put changes nothing
    # Groups that are not kept are accepted even when full.
    failed = make_group(tokens[3], failed=True)
    assert pool.can_put(failed)
    assert kinds(pool.put(failed)) == ["GroupFailed"]
    out = pool.take_batch(0)
    assert out.batch is not None
    assert pool.can_put(make_group(tokens[2]))
    pool.put(make_group(tokens[2]))
    assert pool.size == 2


def test_failed_groups_are_released_and_reported_for_replay(make_group: GroupFactory) -> None:
    gate, pool = build(2, mode="sync")
    a, _b = lease(gate, 2)
    (event,) = pool.put(make_group(a, failed=True))
    assert isinstance(event, GroupFailed)
    assert event.replay
    assert event.reasons == ["timeout"]
    assert event.token == a
    assert pool.size == 0
    assert gate.current(a.lease_id) is None
    assert gate.counters.released == 1
    assert pool.counters.failed_groups == 1
    (c,) = lease(gate, 1)  # the slot came back
    assert c.version == 0
    assert pool.metrics()["pool/failed_groups"] == 1.0


@pytest.mark.parametrize("enabled", [True, False])
def test_zero_variance_filter(make_group: GroupFactory, enabled: bool) -> None:
    gate, pool = build(1, filter_zero_variance=enabled, mode="sync")
    (a,) = lease(gate, 1)
    events = pool.put(make_group(a, rewards=(1.0, 1.0, 1.0)))
    if enabled:
        (event,) = events
        assert isinstance(event, GroupFiltered)
        assert not event.replay
        assert event.reward == 1.0
        assert pool.size == 0
        assert gate.counters.released == 1
        assert pool.metrics()["pool/filtered_zero_variance"] == 1.0
    else:
        assert kinds(events) == ["GroupPooled"]
        assert pool.size == 1


def test_unknown_or_duplicate_leases_are_rejected(make_group: GroupFactory) -> None:
    gate, pool = build(2)
    (a,) = lease(gate, 1)
    with pytest.raises(ValueError, match="not outstanding"):
        pool.put(make_group(VersionToken(lease_id=42, version=0, max_step=1)))
    pool.put(make_group(a))
    with pytest.raises(ValueError, match="already has a group"):
        pool.put(make_group(a))


def test_wait_holds_the_step_for_a_straggler(make_group: GroupFactory) -> None:
    # k = 1, B = 1: leases 0 and 1 at version 0 (deadline 1). Step 0 may take lease 1 (lease 0
    # still fits step 1); at step 1, lease 2 (version 1) is there but lease 0 is due: wait.
    gate, pool = build(1, capacity=1, mode="batch-async", max_staleness=1, on_overdue="wait")
    a, b = lease(gate, 2)
    pool.put(make_group(b))
    out = pool.take_batch(0)
    assert out.batch is not None
    assert out.batch.groups[0].token == b
    gate.advance(1)
    (c,) = lease(gate, 1)
    pool.put(make_group(c))
    out = pool.take_batch(1)
    assert out.batch is None
    assert out.waiting_for == [a]
    assert out.events == [StepWaiting(step=1, waiting_for=[a])]
    assert pool.take_batch(1).events == []  # reported once per step
    assert pool.counters.waits == 1
    # The pool is full, yet it admits the straggler the step waits for.
    assert not pool.can_put()
    assert pool.can_put(make_group(a))
    pool.put(make_group(a))
    assert pool.counters.over_capacity == 1
    out = pool.take_batch(1)
    assert out.batch is not None
    assert out.batch.groups[0].token == a
    assert out.batch.staleness == [1]


def test_wait_lets_a_young_group_go_first_when_slack_allows(make_group: GroupFactory) -> None:
    gate, pool = build(1, mode="batch-async", max_staleness=2, on_overdue="wait")
    old = lease(gate, 3)  # deadline 2
    pool.put(make_group(old[2]))
    assert pool.take_batch(0).batch is not None  # old[0], old[1] still fit steps 1 and 2
    gate.advance(1)
    (young,) = lease(gate, 1)  # deadline 3
    pool.put(make_group(young))
    out = pool.take_batch(1)  # taking `young` would strand old[0] or old[1]
    assert out.batch is None
    assert out.waiting_for == old[:2]
    pool.put(make_group(old[1]))
    out = pool.take_batch(1)
    assert out.batch is not None
    assert out.batch.groups[0].token == old[1]


def test_drop_mode_drops_overdue_groups_and_reports_stragglers(make_group: GroupFactory) -> None:
    gate, pool = build(1, mode="batch-async", max_staleness=1, on_overdue="drop")
    a, b = lease(gate, 2)  # deadline 1
    pool.put(make_group(b))
    assert pool.take_batch(0).batch is not None
    gate.advance(1)
    (c,) = lease(gate, 1)
    pool.put(make_group(c))
    out = pool.take_batch(1)  # does not wait for `a`
    assert out.batch is not None
    assert out.batch.groups[0].token == c
    assert out.events == [LeaseOverdue(token=a, step=2, action="drop")]
    (event,) = pool.put(make_group(a))
    assert isinstance(event, GroupDropped)
    assert event.replay
    assert event.step == 2
    assert gate.current(a.lease_id) is None
    assert gate.counters.dropped == 1
    assert pool.metrics()["pool/dropped_overdue"] == 1.0


def strand_one(
    make_group: GroupFactory, action: str
) -> tuple[StalenessGate, TrajectoryPool, list[VersionToken], list[PoolEvent]]:
    """k = 2, B = 1, no waiting: steps 0 and 1 take young groups, so at step 2 two groups with
    deadline 2 are pooled and one is left behind. Returns the events of step 2."""
    gate, pool = build(1, mode="batch-async", max_staleness=2, on_overdue=action)
    old = lease(gate, 3)
    pool.put(make_group(old[2]))
    assert pool.take_batch(0).batch is not None
    gate.advance(1)
    (young,) = lease(gate, 1)
    pool.put(make_group(young))
    assert pool.take_batch(1).batch is not None
    gate.advance(2)
    pool.put(make_group(old[0]))
    pool.put(make_group(old[1]))
    out = pool.take_batch(2)
    assert out.batch is not None
    assert out.batch.groups[0].token == old[0]
    return gate, pool, old, out.events


def test_drop_mode_sweeps_groups_left_behind(make_group: GroupFactory) -> None:
    gate, pool, old, events = strand_one(make_group, "drop")
    assert kinds(events) == ["GroupDropped"]
    assert isinstance(events[0], GroupDropped)
    assert events[0].token == old[1]
    assert pool.size == 0
    assert gate.current(old[1].lease_id) is None


def test_requeue_mode_sweeps_groups_left_behind(make_group: GroupFactory) -> None:
    gate, pool, old, events = strand_one(make_group, "requeue")
    (event,) = events
    assert isinstance(event, GroupRequeued)
    assert event.step == 3
    assert event.token == VersionToken(lease_id=old[1].lease_id, version=2, max_step=4)
    assert pool.lease_ids() == [old[1].lease_id]
    gate.advance(3)
    out = pool.take_batch(3)
    assert out.batch is not None
    assert out.batch.staleness == [3]


def test_an_anomalous_head_version_is_dropped_even_in_wait_mode(make_group: GroupFactory) -> None:
    gate, pool = build(1, mode="batch-async", max_staleness=1, on_overdue="wait")
    (t0,) = lease(gate, 1)
    pool.put(make_group(t0))
    assert pool.take_batch(0).batch is not None
    gate.advance(1)
    t1, t2 = lease(gate, 2)  # version 1, deadline 2
    pool.put(make_group(t1))
    assert pool.take_batch(1).batch is not None
    gate.advance(2)
    (event,) = pool.put(make_group(t2, head=0))  # 2 - 0 > k although the lease is fine
    assert isinstance(event, GroupDropped)
    assert event.head_version == 0


def test_requeue_mode_releases_a_straggler_under_a_new_lease(make_group: GroupFactory) -> None:
    gate, pool = build(1, mode="batch-async", max_staleness=1, on_overdue="requeue")
    a, b = lease(gate, 2)
    pool.put(make_group(b))
    assert pool.take_batch(0).batch is not None
    gate.advance(1)
    (c,) = lease(gate, 1)
    pool.put(make_group(c))
    out = pool.take_batch(1)
    assert out.events == [LeaseOverdue(token=a, step=2, action="requeue")]
    gate.advance(2)
    requeued, pooled = pool.put(make_group(a))
    assert isinstance(requeued, GroupRequeued)
    assert not requeued.replay
    assert requeued.old_token == a
    assert requeued.token.version == 2
    assert requeued.token.max_step == 3
    assert requeued.head_version == 0
    assert isinstance(pooled, GroupPooled)
    assert pooled.token == requeued.token
    out = pool.take_batch(2)
    assert out.batch is not None
    (group,) = out.batch.groups
    assert group.token == requeued.token
    assert out.batch.staleness == [2]
    assert out.events == []  # requeued once: its old head does not make it overdue again
    assert pool.metrics()["pool/requeued"] == 1.0


def test_events_encode_with_a_kind_tag(make_group: GroupFactory) -> None:
    gate, pool = build(1, mode="sync")
    (a,) = lease(gate, 1)
    (event,) = pool.put(make_group(a, failed=True))
    decoded = msgspec.json.decode(msgspec.json.encode(event), type=PoolEvent)
    assert decoded == event
    assert msgspec.json.decode(msgspec.json.encode(event))["kind"] == "failed"


def test_state_dict_round_trip_keeps_contents(make_group: GroupFactory) -> None:
    gate, pool = build(2, mode="batch-async", max_staleness=1)
    tokens = lease(gate, 4)
    pool.put(make_group(tokens[3]))
    pool.put(make_group(tokens[1], rewards=(0.5, -1.0, 2.0)))
    gate_state = msgspec.msgpack.decode(msgspec.msgpack.encode(gate.state_dict()))
    pool_state = msgspec.msgpack.decode(msgspec.msgpack.encode(pool.state_dict()))
    gate2, pool2 = build(2, mode="batch-async", max_staleness=1)
    gate2.load_state_dict(gate_state)
    pool2.load_state_dict(pool_state)
    assert pool2.state_dict() == pool.state_dict()
    assert pool2.metrics() == pool.metrics()
    assert pool2.reclaim_orphans() == [tokens[0], tokens[2]]
    assert gate2.outstanding_tokens() == [tokens[1], tokens[3]]
    out = pool2.take_batch(0)
    assert out.batch is not None
    assert out.batch.groups[0].rewards == [0.5, -1.0, 2.0]


def test_load_state_dict_needs_the_gate_first(make_group: GroupFactory) -> None:
    gate, pool = build(2)
    (a,) = lease(gate, 1)
    pool.put(make_group(a))
    _, fresh = build(2)
    with pytest.raises(CheckpointError, match="does not have outstanding"):
        fresh.load_state_dict(pool.state_dict())
    with pytest.raises(CheckpointError, match="malformed"):
        fresh.load_state_dict({"groups": 3})


def test_metrics_keys(make_group: GroupFactory) -> None:
    gate, pool = build(2)
    pool.put(make_group(lease(gate, 1)[0]))
    m = pool.metrics()
    assert m["pool/size"] == 1.0
    assert {
        "pool/size",
        "pool/dropped_overdue",
        "pool/filtered_zero_variance",
        "pool/failed_groups",
    } <= set(m)
