"""Flow snapshot/restore and the admission-order invariant, without a loop of rollouts."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import pytest

from nexrl_async.core.errors import CheckpointError
from nexrl_async.core.records import DataItem, Group, VersionToken
from nexrl_async.data.source import RowSource
from nexrl_async.engine.checkpointer import STATE_FORMAT, EngineState
from nexrl_async.engine.flow import Flow, FlowState
from nexrl_async.engine.resume import AdmissionPoint, stitched_admissions
from nexrl_async.obs.ledger import Admitted

FlowFactory = Callable[..., Flow]
GroupFactory = Callable[..., Group]


def data_order(n: int) -> list[str]:
    """What ``make_flow``'s source hands out when nothing is replayed (the uninterrupted order)."""
    source = RowSource([{"x": i} for i in range(40)], shuffle=True, seed=7)
    return [item.key for item in (source.next_item() for _ in range(n)) if item is not None]


async def admit(flow: Flow, n: int) -> list[tuple[VersionToken, DataItem]]:
    out = []
    for _ in range(n):
        got = await flow.admit()
        assert got is not None
        flow.note_admitted(got[0], got[1])
        out.append(got)
    return out


def admitted_events(pairs: list[tuple[VersionToken, DataItem]]) -> list[Admitted]:
    return [
        Admitted(lease_id=t.lease_id, version=t.version, item_key=i.key, group_id="g")
        for t, i in pairs
    ]


def round_trip(state: FlowState) -> FlowState:
    """Through msgpack, as a checkpoint file does."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=FlowState)


def engine_state(flow_state: FlowState) -> EngineState:
    return EngineState(
        format=STATE_FORMAT, step=0, version=0, flow=flow_state, rng={}, trainer=False,
        time=time.time(),
    )  # fmt: skip


async def test_restore_replays_in_flight_items_first_then_continues_the_data(
    new_flow: FlowFactory, group_of: GroupFactory
) -> None:
    first = new_flow()
    leased = await admit(first, 4)  # the gate's limit at version 0: (0 + k + 1) * B = 4
    for token, item in (leased[1], leased[3]):
        await first.put(group_of(token, item.key))
    state = round_trip(first.snapshot())
    assert state.in_flight == [0, 2]
    await admit_later_and_lose(first, leased, group_of)

    resumed = new_flow()
    orphans = resumed.restore(state)
    assert [t.lease_id for t in orphans] == [0, 2]
    assert resumed.pool.lease_ids() == [1, 3]
    assert set(resumed.items) == {1, 3}
    assert resumed.gate.outstanding == 2
    again = await admit(resumed, 2)
    assert [t.lease_id for t, _ in again] == [4, 5]
    assert [i.key for _, i in again] == [leased[0][1].key, leased[2][1].key]
    batch = await resumed.take(0)
    assert batch is not None
    assert [g.item_key for g in batch.groups] == [leased[1][1].key, leased[3][1].key]
    await resumed.advance(1)
    later = await admit(resumed, 2)

    point = AdmissionPoint.of(engine_state(state))
    runs = [admitted_events(leased), admitted_events(again + later)]
    stitched = stitched_admissions(runs, [point])
    assert stitched == data_order(6)


async def admit_later_and_lose(
    flow: Flow, leased: list[tuple[VersionToken, DataItem]], group_of: GroupFactory
) -> None:
    """What the first process does after the snapshot: lost when it dies, nothing carries over."""
    await flow.put(group_of(leased[0][0], leased[0][1].key))
    assert await flow.take(0) is not None
    await flow.advance(1)
    await admit(flow, 2)


async def test_queued_replays_stay_ahead_of_in_flight_items(
    new_flow: FlowFactory, group_of: GroupFactory
) -> None:
    first = new_flow()
    leased = await admit(first, 4)
    await first.put(group_of(leased[0][0], leased[0][1].key, failed=True))  # replay queued
    await first.put(group_of(leased[2][0], leased[2][1].key))
    state = round_trip(first.snapshot())
    assert state.in_flight == [1, 3]
    assert state.queued_replays == 1

    resumed = new_flow()
    resumed.restore(state)
    again = await admit(resumed, 3)
    keys = [leased[i][1].key for i in (0, 1, 3)]
    assert [i.key for _, i in again] == keys
    point = AdmissionPoint.of(engine_state(state))
    stitched = stitched_admissions([admitted_events(leased), admitted_events(again)], [point])
    assert stitched == [*data_order(4), leased[0][1].key]


async def test_restore_refuses_a_state_that_does_not_add_up(
    new_flow: FlowFactory, group_of: GroupFactory
) -> None:
    first = new_flow()
    leased = await admit(first, 2)
    await first.put(group_of(leased[0][0], leased[0][1].key))
    state = first.snapshot()
    with pytest.raises(CheckpointError, match="in flight"):
        new_flow().restore(msgspec.structs.replace(state, in_flight=[0, 1]))
    with pytest.raises(CheckpointError, match="pooled leases"):
        new_flow().restore(msgspec.structs.replace(state, items={1: leased[1][1]}))
    with pytest.raises(CheckpointError, match="staleness gate"):
        new_flow(batch=4).restore(state)


def events(keys: list[str], first_lease: int) -> list[Admitted]:
    return [
        Admitted(lease_id=first_lease + n, version=0, item_key=k, group_id="g")
        for n, k in enumerate(keys)
    ]


def test_stitching_removes_re_admissions_and_rejects_a_resume_that_skips_them() -> None:
    point = AdmissionPoint(leases_issued=3, in_flight=["b"], queued_replays=0)
    before = events(["a", "b", "c", "lost"], 0)
    assert stitched_admissions([before, events(["b", "d"], 3)], [point]) == ["a", "b", "c", "d"]
    assert stitched_admissions([before, []], [point]) == ["a", "b", "c"]
    with pytest.raises(CheckpointError, match="in-flight"):
        stitched_admissions([before, events(["d", "b"], 3)], [point])
    with pytest.raises(CheckpointError, match="run on from 3"):
        stitched_admissions([before, events(["b", "d"], 4)], [point])
    with pytest.raises(CheckpointError, match="did not admit"):
        stitched_admissions([before[:2], events(["b"], 3)], [point])
    with pytest.raises(ValueError, match="resume points"):
        stitched_admissions([before], [point])


def test_stitching_a_chain_of_resumes() -> None:
    # process 0 checkpoints after 3 leases with "b" in flight; process 1 re-admits "b" after
    # the queued replay "r", then checkpoints after lease 6 with its "b" and "d" in flight
    first = AdmissionPoint(leases_issued=3, in_flight=["b"], queued_replays=1)
    second = AdmissionPoint(leases_issued=6, in_flight=["b", "d"], queued_replays=0)
    runs = [
        events(["a", "b", "c", "lost"], 0),
        events(["r", "b", "d", "lost", "lost"], 3),
        events(["b", "d", "e"], 6),
    ]
    assert stitched_admissions(runs, [first, second]) == ["a", "b", "c", "r", "d", "e"]
