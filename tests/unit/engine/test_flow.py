"""The flow: replays follow the pool events' own ``replay`` flag; overdue leases are aborted."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec

from nexrl_async.config.pipeline import PoolConfig, StalenessConfig
from nexrl_async.core.records import FailureReason, Group, Status, Trajectory, Turn, VersionToken
from nexrl_async.data.source import RowSource
from nexrl_async.engine.flow import Flow
from nexrl_async.obs.ledger import Dropped, Pooled, RunLedger, read_events
from nexrl_async.pipeline.pool import TrajectoryPool
from nexrl_async.pipeline.staleness import StalenessGate


def flow_of(tmp_path: Path, *, rows: int = 4, k: int = 1, **staleness: object) -> Flow:
    gate = StalenessGate(StalenessConfig(max_staleness=k, **staleness), batch_groups=1)
    pool = TrajectoryPool(PoolConfig(batch_groups=1, filter_zero_variance=True), gate=gate)
    data = RowSource([{"x": i} for i in range(rows)], shuffle=False)
    return Flow(gate=gate, pool=pool, data=data, ledger=_ledger(tmp_path), max_replays=1)


def _ledger(tmp_path: Path):  # type: ignore[no-untyped-def]

    return RunLedger(tmp_path / "events.jsonl")


def group(token: VersionToken, key: str, rewards: list[float], *, failed: bool = False) -> Group:
    trajs = [
        Trajectory(
            group_id=f"g{token.lease_id}", item_key=key, sample_index=i, token=token,
            turns=[Turn(role="assistant", token_ids=[1, 2], loss_mask=[1, 1])], reward=r,
            status=Status.FAILED if failed else Status.OK,
            failure=FailureReason.TIMEOUT if failed else None,
        )
        for i, r in enumerate(rewards)
    ]  # fmt: skip
    return Group(group_id=f"g{token.lease_id}", item_key=key, token=token, trajectories=trajs)


async def test_a_failed_groups_item_replays_at_most_max_replays_times(tmp_path: Path) -> None:
    flow = flow_of(tmp_path)
    admitted = await flow.admit()
    assert admitted is not None
    token, item = admitted
    await flow.put(group(token, item.key, [0.0, 1.0], failed=True))
    again = await flow.admit()
    assert again is not None
    assert again[1].key == item.key
    await flow.put(group(again[0], item.key, [0.0, 1.0], failed=True))
    following = await flow.admit()
    assert following is not None
    assert following[1].key != item.key
    assert flow.abandoned == 1


async def test_a_filtered_groups_item_is_not_replayed(tmp_path: Path) -> None:
    flow = flow_of(tmp_path)
    admitted = await flow.admit()
    assert admitted is not None
    token, item = admitted
    await flow.put(group(token, item.key, [1.0, 1.0]))  # zero variance: filtered, replay False
    nxt = await flow.admit()
    assert nxt is not None
    assert nxt[1].key != item.key
    assert flow.counts["GroupFiltered"] == 1


async def test_an_overdue_lease_in_flight_is_aborted_under_drop(tmp_path: Path) -> None:
    flow = flow_of(tmp_path, rows=8, k=1, on_overdue="drop")
    first, straggler = await flow.admit(), await flow.admit()  # both at version 0, due by step 1
    assert first is not None
    assert straggler is not None
    cancelled = anyio.Event()

    async def work() -> None:
        with flow.lease_scope(straggler[0]) as scope:
            await anyio.sleep(30)
        assert scope.cancelled_caught
        await flow.release(straggler[0])
        cancelled.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await anyio.wait_all_tasks_blocked()  # the straggler's work is in flight
        await flow.put(group(first[0], first[1].key, [0.0, 1.0]))
        assert await flow.take(0) is not None
        await flow.advance(1)
        fresh = await flow.admit()
        assert fresh is not None
        await flow.put(group(fresh[0], fresh[1].key, [0.0, 1.0]))
        with anyio.fail_after(5):
            assert await flow.take(1) is not None  # drop mode: the step does not wait
            await cancelled.wait()  # the straggler's work was cancelled, not waited for
    replay = await flow.admit()
    assert replay is not None
    assert replay[1].key == straggler[1].key
    dropped = [e for e in read_events(tmp_path / "events.jsonl") if isinstance(e, Dropped)]
    assert [(e.group_id, e.reason) for e in dropped] == [(f"g{straggler[0].lease_id}", "overdue")]


async def test_an_overdue_lease_keeps_running_under_requeue(tmp_path: Path) -> None:
    flow = flow_of(tmp_path, rows=8, k=1, on_overdue="requeue")
    first, straggler = await flow.admit(), await flow.admit()
    assert first is not None
    assert straggler is not None
    with flow.lease_scope(straggler[0]) as scope:
        await flow.put(group(first[0], first[1].key, [0.0, 1.0]))
        assert await flow.take(0) is not None
        await flow.advance(1)
        fresh = await flow.admit()
        assert fresh is not None
        await flow.put(group(fresh[0], fresh[1].key, [0.0, 1.0]))
        assert await flow.take(1) is not None
        assert flow.counts["LeaseOverdue"] == 1  # reported ...
    assert not scope.cancel_called  # ... but its group is re-leased when it arrives


async def test_a_partial_group_trains_is_logged_and_not_replayed(tmp_path: Path) -> None:
    gate = StalenessGate(StalenessConfig(max_staleness=1), batch_groups=1)
    pool = TrajectoryPool(PoolConfig(batch_groups=1, group_by=["task"]), gate=gate)
    data = RowSource([{"task": "t", "x": i} for i in range(3)], shuffle=False)
    flow = Flow(gate=gate, pool=pool, data=data, ledger=_ledger(tmp_path), max_replays=1)
    admitted = await flow.admit()
    assert admitted is not None
    token, item = admitted
    partial = group(token, item.key, [0.0, 1.0, 1.0])
    failed = msgspec.structs.replace(
        partial.trajectories[0], status=Status.FAILED, failure=FailureReason.EVALUATOR_ERROR
    )
    partial = msgspec.structs.replace(partial, trajectories=[failed, *partial.trajectories[1:]])
    await flow.put(partial)
    batch = await flow.take(0)
    assert batch is not None
    (kept,) = batch.groups
    assert [t.sample_index for t in kept.trajectories] == [1, 2]
    assert kept.baseline_key == '["t"]'  # the flow handed the pool the item's fields
    nxt = await flow.admit()
    assert nxt is not None
    assert nxt[1].key != item.key  # trained: not replayed
    flow.ledger.close()
    (pooled,) = [e for e in read_events(tmp_path / "events.jsonl") if isinstance(e, Pooled)]
    assert pooled.samples == 2
    assert pooled.dropped == [FailureReason.EVALUATOR_ERROR]


async def test_workers_at_a_closed_gate_wake_only_when_it_opens(tmp_path: Path) -> None:
    gate = StalenessGate(StalenessConfig(max_staleness=0), batch_groups=2)
    pool = TrajectoryPool(PoolConfig(batch_groups=2), gate=gate)
    data = RowSource([{"x": i} for i in range(16)], shuffle=False)
    flow = Flow(gate=gate, pool=pool, data=data, ledger=_ledger(tmp_path))
    leases = [await flow.admit(), await flow.admit()]
    assert not gate.can_lease()
    checks = 0
    can_lease = gate.can_lease

    def counted() -> bool:
        nonlocal checks
        checks += 1
        return can_lease()

    gate.can_lease = counted  # type: ignore[method-assign]
    admitted: list[int] = []

    async def worker() -> None:
        got = await flow.admit()
        assert got is not None
        admitted.append(got[0].lease_id)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(worker)
        await anyio.wait_all_tasks_blocked()
        parked = checks
        for lease in leases:  # two puts: the batch is ready, the gate still closed
            assert lease is not None
            await flow.put(group(lease[0], lease[1].key, [0.0, 1.0]))
            await anyio.wait_all_tasks_blocked()
        assert checks - parked == 2  # the flow asked once a put; no parked worker re-checked
        assert admitted == []
        batch = await flow.take(0)
        assert batch is not None
        await flow.advance(1)  # the trained step's version is served: two more leases
        await anyio.wait_all_tasks_blocked()
        assert len(admitted) == 2
        tg.cancel_scope.cancel()


async def test_take_calls_on_wait_once_and_only_when_it_has_to_wait(tmp_path: Path) -> None:
    flow = flow_of(tmp_path, rows=8)
    calls: list[int] = []
    first = await flow.admit()
    assert first is not None
    await flow.put(group(first[0], first[1].key, [0.0, 1.0]))
    assert await flow.take(0, on_wait=lambda: calls.append(0)) is not None
    assert calls == []  # ready: no wait
    await flow.advance(1)
    nxt = await flow.admit()
    assert nxt is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: flow.take(1, on_wait=lambda: calls.append(1)))
        await anyio.wait_all_tasks_blocked()
        assert calls == [1]
        await flow.put(group(nxt[0], nxt[1].key, [1.0, 1.0]))  # filtered: the take waits on
        await anyio.wait_all_tasks_blocked()
        again = await flow.admit()
        assert again is not None
        await flow.put(group(again[0], again[1].key, [0.0, 1.0]))
    assert calls == [1]  # once, however often it waited
