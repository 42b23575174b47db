from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from nexrl_async.config.pipeline import StalenessConfig
from nexrl_async.core.errors import CheckpointError
from nexrl_async.core.records import Group, TrainBatch, VersionToken
from nexrl_async.engine.stats import staleness_metrics
from nexrl_async.pipeline.staleness import Fate, StalenessGate


def gate_for(mode: str = "batch-async", batch: int = 2, **kw: object) -> StalenessGate:
    cfg = msgspec.convert({"mode": mode, **kw}, StalenessConfig)
    return StalenessGate(cfg, batch_groups=batch)


def lease_all(gate: StalenessGate) -> list[VersionToken]:
    tokens = []
    while (tok := gate.try_lease()) is not None:
        tokens.append(tok)
    return tokens


def consume(gate: StalenessGate, tokens: list[VersionToken], step: int) -> None:
    for tok in tokens:
        gate.redeem(tok, step)


def test_sync_issues_one_batch_per_version_and_only_after_publication() -> None:
    gate = gate_for("sync", batch=3)
    assert gate.max_staleness == 0
    first = lease_all(gate)
    assert [t.version for t in first] == [0, 0, 0]
    assert [t.max_step for t in first] == [0, 0, 0]
    consume(gate, first, step=0)
    assert not gate.can_lease()  # version 1 is not loaded yet
    gate.advance(1)
    second = lease_all(gate)
    assert [(t.version, t.max_step) for t in second] == [(1, 1)] * 3


def test_sync_ignores_a_nonzero_max_staleness() -> None:
    gate = gate_for("sync", batch=2, max_staleness=3)
    assert gate.max_staleness == 0
    assert len(lease_all(gate)) == 2


def test_batch_async_admits_k_plus_one_batches_ahead() -> None:
    gate = gate_for("batch-async", batch=2, max_staleness=2)
    tokens = lease_all(gate)
    assert len(tokens) == 6 == gate.admission_limit
    assert {t.max_step for t in tokens} == {2}
    assert gate.counters.refused == 1
    consume(gate, tokens[:2], step=0)
    assert not gate.can_lease()  # redeemed leases keep their slot until a publication
    gate.advance(1)
    more = lease_all(gate)
    assert [(t.version, t.max_step) for t in more] == [(1, 3), (1, 3)]
    assert [t.lease_id for t in tokens + more] == list(range(8))


def test_default_k_is_one_in_batch_async() -> None:
    gate = gate_for("batch-async", batch=2)
    assert gate.max_staleness == 1
    assert len(lease_all(gate)) == 4


def test_fully_async_is_limited_by_the_inflight_cap_only() -> None:
    gate = gate_for("fully-async", batch=2, max_inflight_groups=3)
    tokens = lease_all(gate)
    assert len(tokens) == 3
    assert all(t.max_step is None for t in tokens)
    consume(gate, tokens[:2], step=0)
    assert len(lease_all(gate)) == 2  # no publication needed
    assert not gate.is_overdue(100, tokens[2], head_version=0)
    assert gate.fate(100, tokens[2], head_version=0) is Fate.TRAIN
    assert gate.blocking_deadline(1, []) is None


def test_fully_async_default_cap_is_two_batches() -> None:
    assert gate_for("fully-async", batch=3).max_inflight == 6


def test_max_inflight_caps_a_bounded_gate() -> None:
    gate = gate_for("batch-async", batch=2, max_staleness=3, max_inflight_groups=5)
    assert len(lease_all(gate)) == 5


def test_release_returns_the_slot_redeem_does_not() -> None:
    gate = gate_for("sync", batch=2)
    a, b = lease_all(gate)
    gate.release(a)
    c = gate.try_lease()
    assert c is not None
    assert c.lease_id == 2
    gate.drop(b)
    d = gate.try_lease()
    assert d is not None
    consume(gate, [c, d], step=0)
    assert gate.try_lease() is None
    assert msgspec.structs.asdict(gate.counters) == {
        "issued": 4,
        "redeemed": 2,
        "released": 1,
        "dropped": 1,
        "requeued": 0,
        "refused": 2,  # the end of lease_all and the last try_lease
    }
    assert gate.leases_charged == 2


def test_redeem_checks_lease_step_and_deadline() -> None:
    gate = gate_for("batch-async", batch=1, max_staleness=1)
    a, b = lease_all(gate)
    with pytest.raises(ValueError, match="expected step 0"):
        gate.redeem(a, 1)
    gate.redeem(a, 0)
    with pytest.raises(ValueError, match="not outstanding"):
        gate.redeem(a, 1)
    with pytest.raises(ValueError, match="not outstanding"):
        gate.release(a)
    gate.advance(1)
    c = gate.try_lease()
    assert c is not None
    gate.redeem(c, 1)
    with pytest.raises(ValueError, match="overdue"):
        gate.redeem(b, 2)


def test_advance_is_monotonic_and_only_to_produced_versions() -> None:
    gate = gate_for("batch-async", batch=1)
    with pytest.raises(ValueError, match="does not exist yet"):
        gate.advance(1)
    tok = gate.try_lease()
    assert tok is not None
    gate.redeem(tok, 0)
    gate.advance(1)
    with pytest.raises(ValueError, match="not newer"):
        gate.advance(1)


def test_is_overdue_by_deadline_and_by_head_version() -> None:
    gate = gate_for("batch-async", batch=1, max_staleness=1)
    tok = gate.try_lease()
    assert tok is not None
    assert tok.max_step == 1
    assert not gate.is_overdue(1, tok)
    assert gate.is_overdue(2, tok)
    # A head version older than the lease (a fleet anomaly) tightens the bound.
    late = VersionToken(lease_id=99, version=3, max_step=4)
    assert gate.is_overdue(4, late, head_version=2)
    assert not gate.is_overdue(3, late, head_version=2)


@pytest.mark.parametrize(
    ("action", "fate"), [("wait", Fate.DROP), ("drop", Fate.DROP), ("requeue", Fate.REQUEUE)]
)
def test_fate_of_an_overdue_group_follows_on_overdue(action: str, fate: Fate) -> None:
    gate = gate_for("batch-async", batch=1, max_staleness=1, on_overdue=action)
    tok = gate.try_lease()
    assert tok is not None
    assert gate.fate(1, tok, head_version=0) is Fate.TRAIN
    assert gate.fate(2, tok, head_version=0) is fate
    assert gate.on_overdue == action
    assert gate.waits_for_stragglers == (action == "wait")


def test_requeue_reissues_the_lease_at_the_current_version() -> None:
    gate = gate_for("batch-async", batch=1, max_staleness=1, on_overdue="requeue")
    a, b = lease_all(gate)
    gate.redeem(a, 0)
    gate.advance(1)
    new = gate.requeue(b)
    assert (new.lease_id, new.version, new.max_step) == (b.lease_id, 1, 2)
    assert gate.current(b.lease_id) == new
    assert gate.was_requeued(b.lease_id)
    assert gate.leases_charged == 2
    assert gate.counters.requeued == 1
    # Its head version stays 0: staleness 2 > k is allowed for a requeued lease ...
    assert not gate.is_overdue(2, b, head_version=0)
    # ... but the new lease's deadline holds.
    assert gate.is_overdue(3, b, head_version=0)
    with pytest.raises(ValueError, match="fully-async"):
        gate_for("fully-async").requeue(new)


def test_blocking_deadline_refuses_a_young_batch_that_strands_old_leases() -> None:
    # k = 2, B = 1: three leases at version 0 (deadline 2). If steps 0 and 1 took groups that
    # were not among them, step 2 would owe two groups with one slot: the gate must see it.
    gate = gate_for("batch-async", batch=1, max_staleness=2)
    old = lease_all(gate)
    assert len(old) == 3
    assert gate.blocking_deadline(0, [old[2]]) is None  # two left, deadline 2: slots 1, 2
    gate.redeem(old[2], 0)
    gate.advance(1)
    young = gate.try_lease()
    assert young is not None
    assert young.max_step == 3
    assert gate.blocking_deadline(1, [young]) == 2  # would leave two due by step 2, one slot
    assert gate.blocking_deadline(1, [old[0]]) is None
    with pytest.raises(ValueError, match="overdue"):
        gate.blocking_deadline(3, [old[0]])


def test_overdue_outstanding_and_reclaim() -> None:
    gate = gate_for("batch-async", batch=1, max_staleness=1, on_overdue="drop")
    a, b = lease_all(gate)
    assert gate.overdue_outstanding(2) == [a, b]
    assert gate.overdue_outstanding(2, exclude={a.lease_id}) == [b]
    assert gate.overdue_outstanding(1) == []
    assert gate.reclaim(keep={b.lease_id}) == [a]
    assert gate.outstanding_tokens() == [b]
    assert gate.counters.released == 1


def test_state_dict_is_msgpack_able_and_restores_behaviour() -> None:
    gate = gate_for("batch-async", batch=2, max_staleness=1, on_overdue="requeue")
    tokens = lease_all(gate)
    consume(gate, tokens[:2], step=0)
    gate.advance(1)
    gate.requeue(tokens[2])
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(gate.state_dict()))
    clone = gate_for("batch-async", batch=2, max_staleness=1, on_overdue="requeue")
    clone.load_state_dict(state)
    assert clone.state_dict() == gate.state_dict()
    for g in (gate, clone):
        assert g.was_requeued(tokens[2].lease_id)
    assert lease_all(clone) == lease_all(gate)
    assert clone.metrics() == gate.metrics()


def test_load_state_dict_rejects_other_settings_and_garbage() -> None:
    state = gate_for("batch-async", batch=2).state_dict()
    with pytest.raises(CheckpointError, match="batch_groups"):
        gate_for("batch-async", batch=3).load_state_dict(state)
    with pytest.raises(CheckpointError, match="mode"):
        gate_for("sync", batch=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="malformed"):
        gate_for("batch-async", batch=2).load_state_dict({**state, "version": "x"})


def test_metrics_are_slash_namespaced_floats() -> None:
    gate = gate_for("batch-async", batch=2)
    lease_all(gate)
    m = gate.metrics()
    assert m["pipeline/leases_outstanding"] == 4.0
    assert m["pipeline/lease_refusals"] == 1.0
    assert all(k.startswith("pipeline/") and isinstance(v, float) for k, v in m.items())


def test_staleness_metrics(make_group: Callable[..., Group]) -> None:
    groups: list[Group] = [
        make_group(VersionToken(lease_id=0, version=1), head=1),
        make_group(VersionToken(lease_id=1, version=3), head=3),
    ]
    metrics = staleness_metrics(TrainBatch(step=4, groups=groups))
    assert metrics == {"pipeline/staleness_max": 3.0, "pipeline/staleness_mean": 2.0}
    assert staleness_metrics(TrainBatch(step=0, groups=[])) == {}
