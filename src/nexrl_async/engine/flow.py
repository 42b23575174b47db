"""The async face of the staleness gate and the trajectory pool.

Gate and pool are pure synchronous state machines (``pipeline/``); :class:`Flow` puts them under
one ``anyio.Condition`` and re-asks after every change. Three kinds of waiters:

- rollout workers in :meth:`Flow.admit` wait for a lease (the gate's backpressure) and take the
  next data item with it;
- rollout workers in :meth:`Flow.put` wait for pool capacity;
- the trainer in :meth:`Flow.take` waits for the batch of its step (and, under ``wait``, for
  stragglers the staleness bound needs).

Every pool outcome is written to the ledger here, and a group whose event says ``replay`` gives
its item back to the data source (a failed group's item at most ``max_replays`` times). The item
of each outstanding lease is remembered so a checkpoint can save in-flight items as replays.

Overdue leases (``staleness.on_overdue = "drop"``): when a lease still in flight can no longer
be trained (the pool reports :class:`~nexrl_async.pipeline.pool.LeaseOverdue`), its group would
be dropped on arrival, so the flow cancels the work at once: rollout workers run each group
inside :meth:`Flow.lease_scope`, whose cancel scope is cancelled here; the worker then releases
the lease and the item is replayed. Under ``requeue`` the group is re-leased when it arrives.

Checkpoints: :meth:`Flow.snapshot` captures gate, pool (contents included), data cursor, the
items of outstanding leases and the replay counters in one synchronous call (no await: nothing
moves while it runs); :meth:`Flow.restore` puts them back into a freshly built flow in the
order their checks need (see ``engine.resume``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from anyio import CancelScope

from nexrl_async.config.pipeline import FaultsConfig
from nexrl_async.core.errors import CheckpointError
from nexrl_async.core.protocols import DataSource
from nexrl_async.core.records import DataItem, FailureReason, Group, TrainBatch, VersionToken
from nexrl_async.engine.breaker import FailureBreaker
from nexrl_async.obs.ledger import Admitted, Dropped, Failed, Pooled, RunLedger, Trained
from nexrl_async.pipeline.pool import (
    GroupDropped,
    GroupFailed,
    GroupFiltered,
    GroupPooled,
    LeaseOverdue,
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
        breaker: FailureBreaker | None = None,
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
        lock = anyio.Lock(fast_acquire=True)  # no trip round the event loop when it is free
        self._gate_open = anyio.Condition(lock)
        """Workers waiting in :meth:`admit`: woken only when one could lease (or stop)."""
        self._changed = anyio.Condition(lock)
        """The trainer in :meth:`take` and workers waiting for pool capacity."""
        self._scopes: dict[int, CancelScope] = {}
        self.breaker = breaker or FailureBreaker(FaultsConfig())

    async def admit(self) -> tuple[VersionToken, DataItem] | None:
        """A lease and its item, waiting at the gate; ``None`` once the data is exhausted."""
        start = anyio.current_time()
        await anyio.lowlevel.checkpoint()  # a worker whose groups fail at once lets others run
        async with self._changed:
            while True:
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
                await self._gate_open.wait()

    @staticmethod
    def group_id(token: VersionToken) -> str:
        """The id of the group a lease's work becomes (``g<lease id>``)."""
        return f"g{token.lease_id}"

    def note_admitted(self, token: VersionToken, item: DataItem) -> None:
        self.ledger.emit(
            Admitted(
                lease_id=token.lease_id,
                version=token.version,
                item_key=item.key,
                group_id=self.group_id(token),
            )
        )

    @contextmanager
    def lease_scope(self, token: VersionToken) -> Iterator[CancelScope]:
        """The cancel scope of a lease's work; cancelled once the lease is overdue (``drop``)."""
        with CancelScope() as scope:
            self._scopes[token.lease_id] = scope
            try:
                yield scope
            finally:
                self._scopes.pop(token.lease_id, None)

    async def put(self, group: Group) -> None:
        """Offer a finished group, waiting while the pool is full."""
        async with self._changed:
            while not self.pool.can_put(group):
                await self._changed.wait()
            item = self.items.get(group.token.lease_id)
            self._handle(self.pool.put(group, None if item is None else item.fields))
            self._notify()

    async def release(self, token: VersionToken) -> None:
        """A lease whose group will never arrive (its worker was cancelled): replay the item."""
        async with self._changed:
            if self.gate.current(token.lease_id) is not None:
                self.gate.release(token)
            item = self.items.pop(token.lease_id, None)
            if item is not None:
                self.data.replay(item)
            self._notify()

    async def take(
        self, step: int, *, on_wait: Callable[[], None] | None = None
    ) -> TrainBatch | None:
        """The batch for ``step``; ``None`` when no batch can ever be formed (data exhausted).
        ``on_wait`` is called once if the batch is not ready yet, before waiting for it."""
        async with self._changed:
            while True:
                handout = self.pool.take_batch(step)
                self._handle(handout.events)
                if handout.batch is not None:
                    self._trained(handout.batch)
                    self._notify()
                    return handout.batch
                if self._exhausted():
                    return None
                if on_wait is not None:
                    call, on_wait = on_wait, None
                    call()
                await self._changed.wait()

    @property
    def version(self) -> int:
        """The policy version the fleet serves (the gate's: its one owner)."""
        return self.gate.version

    async def advance(self, version: int) -> None:
        """Every server now serves ``version``: admit the leases it allows (the publisher
        calls it once the version is verified everywhere)."""
        async with self._changed:
            self.gate.advance(version)
            self._notify()

    def snapshot(self) -> FlowState:
        """The state to checkpoint, taken at once (synchronous: call it on the loop thread)."""
        outstanding = [tok.lease_id for tok in self.gate.outstanding_tokens()]
        missing = [lease for lease in outstanding if lease not in self.items]
        assert not missing, f"outstanding leases without an item: {missing}"
        pooled = set(self.pool.lease_ids())
        queued = self.data.pending_replays
        return FlowState(
            gate=self.gate.state_dict(),
            pool=self.pool.state_dict(),
            data=self.data.state_dict(),
            items={lease: self.items[lease] for lease in outstanding},
            in_flight=[lease for lease in outstanding if lease not in pooled],
            queued_replays=queued,
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

    def _notify(self) -> None:
        """After a change (lock held): wake the trainer and pool-capacity waiters, and the
        workers at the gate only when the gate would lease (:meth:`admit` goes on only then).
        Waking them on every put cost the demo ~500 useless wake-ups a step (32 workers)."""
        self._changed.notify_all()
        if self.gate.can_lease():
            self._gate_open.notify_all()

    def _exhausted(self) -> bool:
        return (
            self.data.exhausted
            and self.gate.outstanding == self.pool.size
            and (self.pool.size < self.gate.batch_groups)
        )

    def _handle(self, events: list[PoolEvent]) -> None:
        for event in events:
            self.counts[type(event).__name__] += 1
            if isinstance(event, GroupPooled):
                self._pooled(event)
            elif isinstance(event, GroupFailed | GroupDropped | GroupFiltered):
                self._settle(event)
                if not isinstance(event, GroupDropped):
                    self.breaker.record(event.reasons if isinstance(event, GroupFailed) else None)
            elif isinstance(event, LeaseOverdue) and event.action == "drop":
                self._abort(event.token)

    def _pooled(self, event: GroupPooled) -> None:
        """A kept group: logged with the samples it lost; its failures feed the breaker (as a
        failed group only when ``degraded``)."""
        dropped = [FailureReason(r) for r in event.dropped]
        zeroed = [FailureReason(r) for r in event.zeroed]
        self.ledger.emit(
            Pooled(
                group_id=event.group_id, head_version=event.head_version,
                samples=event.samples, dropped=dropped, zeroed=zeroed,
            )
        )  # fmt: skip
        failures = [*event.dropped, *event.zeroed]
        self.breaker.record(failures or None, trained=not event.degraded)

    def _settle(self, event: GroupFailed | GroupDropped | GroupFiltered) -> None:
        """A group that will not be trained: log it, replay its item if the event says so."""
        item = self.items.pop(event.token.lease_id, None)
        if isinstance(event, GroupFailed):
            reasons = [FailureReason(r) for r in event.reasons]
            self.ledger.emit(
                Failed(group_id=event.group_id, item_key=event.item_key, reasons=reasons)
            )
        else:
            reason = "overdue" if isinstance(event, GroupDropped) else "zero_variance"
            self.ledger.emit(
                Dropped(group_id=event.group_id, item_key=event.item_key, reason=reason)
            )
        if event.replay and item is not None:
            self._replay(item, counted=isinstance(event, GroupFailed))

    def _abort(self, token: VersionToken) -> None:
        """Cancel the in-flight work of an overdue lease (its worker releases it, see
        :meth:`lease_scope`)."""
        scope = self._scopes.get(token.lease_id)
        if scope is not None and not scope.cancel_called:
            scope.cancel()
            item = self.items.get(token.lease_id)
            key = item.key if item is not None else ""
            self.ledger.emit(Dropped(group_id=self.group_id(token), item_key=key, reason="overdue"))

    def _replay(self, item: DataItem, *, counted: bool) -> None:
        """Hand ``item`` out again; a failed group's item at most ``max_replays`` times."""
        if not counted:
            self.data.replay(item)
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
        heads = [g.head_version for g in batch.groups]
        self.ledger.emit(
            Trained(
                step=batch.step,
                group_ids=[g.group_id for g in batch.groups],
                item_keys=[g.item_key for g in batch.groups],
                head_versions=heads,
                staleness=[batch.step - head for head in heads],  # TrainBatch.staleness
                policy_version=self.gate.version_after(batch.step),
            )
        )
