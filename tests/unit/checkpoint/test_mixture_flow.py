"""A mixture's cursor through the engine's checkpoint path: Flow.snapshot, msgpack, restore."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from nexrl_async.config.pipeline import PoolConfig, StalenessConfig
from nexrl_async.core.records import DataItem, Group, VersionToken
from nexrl_async.data import MixtureSource, RowSource, source_of
from nexrl_async.engine.checkpointer import STATE_FORMAT, EngineState
from nexrl_async.engine.flow import Flow, FlowState
from nexrl_async.engine.resume import AdmissionPoint, stitched_admissions
from nexrl_async.obs.ledger import Admitted, RunLedger
from nexrl_async.pipeline.pool import TrajectoryPool
from nexrl_async.pipeline.staleness import StalenessGate

GroupFactory = Callable[..., Group]


def data() -> MixtureSource:
    sources = [
        RowSource([{"x": i} for i in range(30)], shuffle=True, seed=1, epochs=2, name="a"),
        RowSource([{"y": i} for i in range(10)], shuffle=True, seed=2, epochs=2, name="b"),
    ]
    return MixtureSource(sources, [3.0, 1.0], seed=7)


def new_flow(tmp_path: Path, batch: int = 2) -> Flow:
    gate = StalenessGate(StalenessConfig(max_staleness=1), batch_groups=batch)
    pool = TrajectoryPool(PoolConfig(batch_groups=batch), gate=gate)
    ledger = RunLedger(tmp_path / f"events-{id(gate)}.jsonl")
    return Flow(gate=gate, pool=pool, data=data(), ledger=ledger)


async def admit(flow: Flow, n: int) -> list[tuple[VersionToken, DataItem]]:
    out = []
    for _ in range(n):
        got = await flow.admit()
        assert got is not None
        out.append(got)
    return out


def admitted(pairs: list[tuple[VersionToken, DataItem]]) -> list[Admitted]:
    return [
        Admitted(lease_id=t.lease_id, version=t.version, item_key=i.key, group_id="g")
        for t, i in pairs
    ]


async def test_a_mixture_resumes_from_a_flow_checkpoint_to_the_uninterrupted_order(
    tmp_path: Path, group_of: GroupFactory
) -> None:
    """Steps 0-2 run, then a checkpoint with two leases in flight, one pooled and a failed
    group's item queued for replay; a fresh flow restores it and admits on. The admissions of
    both processes, stitched the way ``engine.resume`` reads the ledger, equal the admission
    order of a run that never stopped (replays and all)."""
    first = new_flow(tmp_path)
    leased = await admit(first, 4)
    for step in range(3):  # train two batches' worth, a version per step
        for token, item in leased[-4:-2]:
            await first.put(group_of(token, item.key))
        assert await first.take(step) is not None
        await first.advance(step + 1)
        leased += await admit(first, 2)
    failed, pooled = leased[-4], leased[-3]
    await first.put(group_of(failed[0], failed[1].key, failed=True))  # its item is replayed
    await first.put(group_of(pooled[0], pooled[1].key))
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(first.snapshot()), type=FlowState)
    assert state.in_flight == [leased[-2][0].lease_id, leased[-1][0].lease_id]
    assert state.queued_replays == 1
    assert {source_of(i.key) for _, i in leased} == {"a", "b"}

    resumed = new_flow(tmp_path)
    resumed.restore(state)
    again = await admit(resumed, 3)
    assert [i.key for _, i in again] == [failed[1].key, leased[-2][1].key, leased[-1][1].key]
    point = AdmissionPoint.of(
        EngineState(
            format=STATE_FORMAT,
            step=3,
            version=3,
            flow=state,
            rng={},
            trainer=False,
            time=time.time(),
        )
    )
    stitched = stitched_admissions([admitted(leased), admitted(again)], [point])

    reference = data()  # the uninterrupted order: every draw once, the failed item replayed
    order = [reference.next_item() for _ in range(len(leased))]
    expected = [i.key for i in order if i is not None] + [failed[1].key]
    assert stitched == expected
    assert resumed.data.metrics()["data/draws"] == len(leased)
