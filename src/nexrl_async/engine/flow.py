"""The async face of the staleness gate and the trajectory pool.

Gate and pool are pure synchronous state machines (``pipeline/``); :class:`Flow` puts them under
one ``anyio.Condition`` and re-asks after every change. Three kinds of waiters:

- rollout workers in :meth:`Flow.admit` wait for a lease (the gate's backpressure) and take the
  next data item with it;
- rollout workers in :meth:`Flow.put` wait for pool capacity;
- the trainer in :meth:`Flow.take` waits for the batch of its step (and, under ``wait``, for
  stragglers the staleness bound needs).

Every pool outcome is written to the ledger here, and failed or dropped groups give their item
back to the data source for replay. The item of each outstanding lease is remembered so a
checkpoint can save in-flight items as replays.

Checkpoints: :meth:`Flow.snapshot` captures gate, pool (contents included), data cursor, the
items of outstanding leases and the replay counters in one synchronous call (no await: nothing
moves while it runs); :meth:`Flow.restore` puts them back into a freshly built flow in the
order their checks need (see ``engine.resume``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import msgspec

from nexrl_async.core.errors import CheckpointError
from nexrl_async.core.protocols import DataSource
from nexrl_async.core.records import DataItem, FailureReason, Group, TrainBatch, VersionToken
from nexrl_async.obs.ledger import Admitted, Dropped, Failed, Pooled, RunLedger, Trained
from nexrl_async.pipeline.pool import (
    GroupDropped,
    GroupFailed,
    GroupFiltered,
    GroupPooled,
    PoolEvent,
    TrajectoryPool,
)
from nexrl_async.pipeline.staleness import StalenessGate


class FlowState(msgspec.Struct, kw_only=True):
    """Everything :meth:`Flow.restore` needs; msgpack-able."""

    gate: dict[str, Any]
    pool: dict[str, Any]
    data: dict[str, Any]
    """The data cursor, without the in-flight items (they are replayed on restore)."""
    items: dict[int, DataItem]
    """Lease id → item, for every outstanding lease (pooled and in flight)."""
    in_flight: list[int]
    """Outstanding leases with no group in the pool, ascending (their work is lost)."""
    queued_replays: int | None
    """Items already waiting in the data source's replay queue, if the source says."""
    failures: dict[str, int]
    counts: dict[str, int]
    abandoned: int


class Flow:
    """Gate + pool + data source behind one condition; see the module docstring."""

    def __init__(
        self,
        *,
        gate: StalenessGate,
        pool: TrajectoryPool,
        data: DataSource,
        ledger: RunLedger,
        max_replays: int = 2,
    ) -> None:
        self.gate = gate
        self.pool = pool
        self.data = data
        self.ledger = ledger
        self.items: dict[int, DataItem] = {}
        """Lease id → the item its group is for (outstanding leases and pooled groups)."""
        self.counts: Counter[str] = Counter()
        self.max_replays = max_replays
        self.abandoned = 0
        self._failures: Counter[str] = Counter()
        self.gate_wait_s = 0.0
        self._changed = anyio.Condition()
        self._closed = False

    async def admit(self) -> tuple[VersionToken, DataItem] | None:
        """A lease and its item, waiting at the gate; ``None`` once the data is exhausted."""
        start = anyio.current_time()
        async with self._changed:
            while True:
                if self._closed:
                    return None
                if self.gate.can_lease():
                    item = self.data.next_item()
                    if item is not None:
                        token = self.gate.try_lease()
                        assert token is not None  # can_lease() said so, and nothing awaited
                        self.items[token.lease_id] = item
                        self.gate_wait_s += anyio.current_time() - start
                        return token, item
                    if self.gate.outstanding == 0:
                        return None  # nothing left and nothing in flight that could replay
                await self._changed.wait()

    def note_admitted(self, token: VersionToken, item: DataItem, group_id: str) -> None:
        self.ledger.emit(
            Admitted(
                lease_id=token.lease_id, version=token.version, item_key=item.key, group_id=group_id
            )
        )

    async def put(self, group: Group) -> None:
        """Offer a finished group, waiting while the pool is full."""
        async with self._changed:
            while not self.pool.can_put(group):
                await self._changed.wait()
            self._handle(self.pool.put(group))
            self._changed.notify_all()

    async def release(self, token: VersionToken) -> None:
        """A lease whose group will never arrive (its worker was cancelled): replay the item."""
        async with self._changed:
            if self.gate.current(token.lease_id) is not None:
                self.gate.release(token)
            item = self.items.pop(token.lease_id, None)
            if item is not None:
                self.data.replay(item)
            self._changed.notify_all()

    async def take(self, step: int) -> TrainBatch | None:
        """The batch for ``step``; ``None`` when no batch can ever be formed (data exhausted)."""
        async with self._changed:
            while True:
                handout = self.pool.take_batch(step)
                self._handle(handout.events)
                if handout.batch is not None:
                    self._trained(handout.batch)
                    self._changed.notify_all()
                    return handout.batch
                if self._exhausted():
                    return None
                await self._changed.wait()

    async def advance(self, version: int) -> None:
        """Every server now serves ``version``: admit the leases it allows."""
        async with self._changed:
            self.gate.advance(version)
            self._changed.notify_all()

    async def close(self) -> None:
        """Stop admitting; waiting workers get ``None``."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    def snapshot(self) -> FlowState:
        """The state to checkpoint, taken at once (synchronous: call it on the loop thread)."""
        outstanding = [tok.lease_id for tok in self.gate.outstanding_tokens()]
        missing = [lease for lease in outstanding if lease not in self.items]
        assert not missing, f"outstanding leases without an item: {missing}"
        pooled = set(self.pool.lease_ids())
        queued = getattr(self.data, "pending_replays", None)
        return FlowState(
            gate=self.gate.state_dict(),
            pool=self.pool.state_dict(),
            data=self.data.state_dict(),
            items={lease: self.items[lease] for lease in outstanding},
            in_flight=[lease for lease in outstanding if lease not in pooled],
            queued_replays=queued if isinstance(queued, int) else None,
            failures=dict(self._failures),
            counts=dict(self.counts),
            abandoned=self.abandoned,
        )

    def restore(self, state: FlowState) -> list[VersionToken]:
        """Load ``state`` into this (fresh) flow; return the in-flight leases it released.

        Order: gate, pool (its groups' leases must be in the gate), data cursor, then the
        orphans (leases in flight when the snapshot was taken) are released and their items
        queued for replay in lease order, after the cursor's own replay queue.
        """
        self.gate.load_state_dict(state.gate)
        self.pool.load_state_dict(state.pool)
        self.data.load_state_dict(state.data)
        orphans = self.pool.reclaim_orphans()
        if [tok.lease_id for tok in orphans] != state.in_flight:
            raise CheckpointError(
                f"checkpoint lists leases {state.in_flight} in flight, but gate and pool "
                f"leave {[tok.lease_id for tok in orphans]} without a group"
            )
        for token in orphans:
            item = state.items.get(token.lease_id)
            if item is None:
                raise CheckpointError(f"checkpoint lacks the item of lease {token.lease_id}")
            self.data.replay(item)
        pooled = self.pool.lease_ids()
        if lost := [lease for lease in pooled if lease not in state.items]:
            raise CheckpointError(f"checkpoint lacks the items of pooled leases {lost}")
        self.items = {lease: state.items[lease] for lease in pooled}
        self._failures = Counter(state.failures)
        self.counts = Counter(state.counts)
        self.abandoned = state.abandoned
        return orphans

    def _exhausted(self) -> bool:
        no_data = getattr(self.data, "exhausted", False)
        return (
            bool(no_data)
            and self.gate.outstanding == self.pool.size
            and (self.pool.size < self.gate.batch_groups)
        )

    def _handle(self, events: list[PoolEvent]) -> None:
        for event in events:
            self.counts[type(event).__name__] += 1
            if isinstance(event, GroupPooled):
                self.ledger.emit(Pooled(group_id=event.group_id, head_version=event.head_version))
            elif isinstance(event, GroupFailed):
                self._replay_failed(self.items.pop(event.token.lease_id, None))
                reasons = [FailureReason(r) for r in event.reasons]
                self.ledger.emit(
                    Failed(group_id=event.group_id, item_key=event.item_key, reasons=reasons)
                )
            elif isinstance(event, GroupDropped):
                item = self.items.pop(event.token.lease_id, None)
                if item is not None:
                    self.data.replay(item)
                self._dropped(event.group_id, event.item_key, "overdue")
            elif isinstance(event, GroupFiltered):
                self.items.pop(event.token.lease_id, None)
                self._dropped(event.group_id, event.item_key, "zero_variance")

    def _dropped(self, group_id: str, item_key: str, reason: str) -> None:
        self.ledger.emit(Dropped(group_id=group_id, item_key=item_key, reason=reason))

    def _replay_failed(self, item: DataItem | None) -> None:
        """Replay a failed group's item, at most ``max_replays`` times per item."""
        if item is None:
            return
        self._failures[item.key] += 1
        if self._failures[item.key] <= self.max_replays:
            self.data.replay(item)
        else:
            self.abandoned += 1
            del self._failures[item.key]

    def _trained(self, batch: TrainBatch) -> None:
        for group in batch.groups:
            self.items.pop(group.token.lease_id, None)
        self.ledger.emit(
            Trained(
                step=batch.step,
                group_ids=[g.group_id for g in batch.groups],
                item_keys=[g.item_key for g in batch.groups],
                head_versions=[g.head_version for g in batch.groups],
                staleness=batch.staleness,
                policy_version=batch.step + 1,
            )
        )
