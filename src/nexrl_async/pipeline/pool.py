"""Trajectory pool: the bounded set of finished groups between rollouts and the trainer.

Pure synchronous logic like the gate it works with; the engine adds the awaiting (a worker
waits until :meth:`TrajectoryPool.can_put` holds, the trainer until :meth:`take_batch` returns
a batch) and logs the :data:`PoolEvent` s every call returns to the ledger. The pool never logs.

A group arrives complete from a worker and goes through, in order:

1. Failed samples (``pool.failed_samples``, ``partial_groups``): dropped from the group or
   kept with reward 0; a group left with fewer than ``min_group_size`` samples (or any failed
   sample under ``drop_group``) FAILS: not kept, lease released, item replayed.
   With ``pool.group_by`` the group then gets its item's grouping key (``grouping``).
2. Zero reward variance, when ``filter_zero_variance``: not kept; lease released, no replay.
3. Staleness (:meth:`StalenessGate.fate` for the next step): overdue groups are dropped (lease
   released, item replayed) or, with ``requeue``, re-leased at the current version and kept.
4. Kept, keyed by lease id. Only this step is subject to capacity.

``take_batch(step)`` offers the ``batch_groups`` oldest groups (lease version, then head
version, then lease id: earliest deadline first; with ``group_by``, groups of the last lease
version taken go by whole key groups, ``grouping.cluster_by_key``). What each
``on_overdue`` means for a step:

* ``wait``: step ``s`` is handed its batch only when it has ``B`` groups *and* taking the ``B``
  oldest leaves every other outstanding lease a step before its deadline (the gate's
  :meth:`~StalenessGate.blocking_deadline`). So it waits for every lease with ``max_step == s``
  still in flight, and also for an older lease with a later ``max_step`` when taking younger
  groups now would leave more groups due by some step ``t`` than steps ``s+1..t`` can take. It
  never waits longer than that (the proof is in ``staleness``). The leases it waits for are
  in :attr:`Handout.waiting_for`; a full pool still admits them, so the wait cannot deadlock
  against backpressure. Nothing is dropped (except a group whose head version is older than
  its lease, which only a misbehaving fleet produces).
* ``drop``: a step never waits for stragglers. Groups that would be overdue are dropped (at
  put, or right after the step that left them behind), their items replayed.
* ``requeue``: as ``drop``, but the group is re-leased at the current version and kept; its head
  version stays, so its staleness may exceed ``k`` (counted as ``pool/requeued``).

After a step, leases still in flight that just became overdue (``drop``/``requeue`` only) are
reported as :class:`LeaseOverdue`: under ``drop`` the engine aborts their work at once (their
group would be dropped on arrival) and replays the item; under ``requeue`` they run on and are
re-leased when they arrive.

When to ask again: ``take_batch`` may change its answer after a put, a released or dropped
lease, or a requeue; ``can_put`` after a step, a put, or a released lease; the gate's
``can_lease`` after a redeem (in-flight cap), a release or drop, or a publication.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from nexrl_async.config.pipeline import PoolConfig
from nexrl_async.core.errors import CheckpointError, ConfigError
from nexrl_async.core.records import Group, TrainBatch, VersionToken
from nexrl_async.pipeline.grouping import baseline_key, cluster_by_key
from nexrl_async.pipeline.partial_groups import Settled, settle_failures
from nexrl_async.pipeline.pool_events import (
    GroupDropped,
    GroupFailed,
    GroupFiltered,
    GroupPooled,
    GroupRequeued,
    Handout,
    LeaseOverdue,
    PoolEvent,
    StepWaiting,
)
from nexrl_async.pipeline.pool_state import PoolCounters, PoolState
from nexrl_async.pipeline.staleness import Fate, StalenessGate

__all__ = [
    "GroupDropped",
    "GroupFailed",
    "GroupFiltered",
    "GroupPooled",
    "GroupRequeued",
    "Handout",
    "LeaseOverdue",
    "PoolEvent",
    "StepWaiting",
    "TrajectoryPool",
]


_Kind = Literal["failed", "filtered"] | Fate


class TrajectoryPool:
    """Bounded pool of finished groups; see the module docstring."""

    def __init__(self, cfg: PoolConfig, *, gate: StalenessGate) -> None:
        capacity = cfg.capacity_groups or 2 * cfg.batch_groups
        if gate.batch_groups != cfg.batch_groups:
            raise ConfigError(
                f"pool.batch_groups = {cfg.batch_groups}, but the staleness gate was built "
                f"for {gate.batch_groups} groups per step",
                path="pool.batch_groups",
            )
        if capacity < cfg.batch_groups:
            raise ConfigError(
                f"pool.capacity_groups = {capacity} cannot hold one batch of "
                f"{cfg.batch_groups} groups",
                path="pool.capacity_groups",
            )
        self._gate = gate
        self._batch = cfg.batch_groups
        self._capacity = capacity
        self._filter = cfg.filter_zero_variance
        self._failed_samples = cfg.failed_samples
        self._min_group = cfg.min_group_size
        self._group_by = list(cfg.group_by)
        self._groups: dict[int, Group] = {}
        self._heads: dict[int, int] = {}
        self._waited_step: int | None = None
        self.counters = PoolCounters()

    @property
    def size(self) -> int:
        return len(self._groups)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def next_step(self) -> int:
        """The step the next batch is for (kept by the gate)."""
        return self._gate.next_step

    def lease_ids(self) -> list[int]:
        return sorted(self._groups)

    # -- put -------------------------------------------------------------------------------

    def can_put(self, group: Group | None = None) -> bool:
        """Whether :meth:`put` would accept ``group`` now (or any kept group, if ``None``).

        Groups that are not kept (failed, filtered, dropped) are always accepted. A full pool
        still accepts a group the next step waits for.
        """
        if len(self._groups) < self._capacity:
            return True
        if group is None:
            return False
        token = self._current_token(group)
        if self._classify(self._settle(group), token) not in (Fate.TRAIN, Fate.REQUEUE):
            return True
        horizon = self._blocking_deadline()
        return horizon is not None and token.max_step is not None and token.max_step <= horizon

    def put(self, group: Group, fields: Mapping[str, Any] | None = None) -> list[PoolEvent]:
        """Offer a finished group; ``fields`` are its item's (for ``group_by``; without them
        the group is its own advantage group). Raises ``OverflowError`` if full: check
        :meth:`can_put`."""
        token = self._current_token(group)
        if token.lease_id in self._groups:
            raise ValueError(f"lease {token.lease_id} already has a group in the pool")
        settled = self._settle(group)
        kind = self._classify(settled, token)
        if kind == "failed" or settled.group is None:
            return [self._fail(group, token)]
        original, group = group, settled.group
        if self._group_by and fields is not None:
            key = baseline_key(fields, self._group_by)
            group = msgspec.structs.replace(group, baseline_key=key)
        if kind == "filtered":
            return [self._filter_out(group, token)]
        step = self.next_step
        if kind is Fate.DROP:
            return [self._drop(group, token, step)]
        if not self.can_put(group):
            raise OverflowError(f"pool is full ({self.size}/{self._capacity} groups)")
        if len(self._groups) >= self._capacity:
            self.counters.over_capacity += 1
        events: list[PoolEvent] = []
        if kind is Fate.REQUEUE:
            events.append(self._requeue(group, token, step))
            token = self._gate.current(token.lease_id) or token
        self._keep(msgspec.structs.replace(group, token=token))
        events.append(self._pooled(settled, original, token))
        return events

    # -- take ------------------------------------------------------------------------------

    def take_batch(self, step: int) -> Handout:
        """The batch for ``step`` (which must be :attr:`next_step`) once it is ready."""
        if step != self.next_step:
            raise ValueError(f"take_batch({step}) but the next step is {self.next_step}")
        events = self._sweep(step)
        chosen = self._earliest()
        if len(chosen) < self._batch:
            return Handout(batch=None, events=events)
        horizon = self._blocking_deadline(step, chosen)
        if horizon is not None:
            stragglers = self._in_flight(up_to=horizon)
            if self._waited_step != step:
                self._waited_step = step
                self.counters.waits += 1
                events.append(StepWaiting(step=step, waiting_for=stragglers))
            return Handout(batch=None, events=events, waiting_for=stragglers)
        groups = [self._groups.pop(lease_id) for lease_id in chosen]
        for group in groups:
            del self._heads[group.token.lease_id]
            self._gate.redeem(group.token, step)
        self.counters.handed_out += len(groups)
        events.extend(self._sweep(step + 1))
        events.extend(self._newly_overdue(step))
        return Handout(batch=TrainBatch(step=step, groups=groups), events=events)

    def reclaim_orphans(self) -> list[VersionToken]:
        """After a resume: release the gate's leases that have no group here (lost in flight)."""
        return self._gate.reclaim(keep=set(self._groups))

    # -- metrics and checkpoints -----------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        return {"pool/size": float(self.size), **self.counters.metrics()}

    def state_dict(self) -> dict[str, Any]:
        """Contents and counters, JSON- and msgpack-able. Save the gate with it."""
        groups = [self._groups[i] for i in sorted(self._groups)]
        state = PoolState(groups=groups, counters=self.counters, waited_step=self._waited_step)
        result: dict[str, Any] = msgspec.to_builtins(state)
        return result

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore contents; load the gate's state first (every group's lease must be in it)."""
        try:
            loaded = msgspec.convert(dict(state), PoolState)
        except msgspec.ValidationError as err:
            raise CheckpointError(f"trajectory pool state is malformed: {err}") from err
        self._groups.clear()
        self._heads.clear()
        for group in loaded.groups:
            if self._gate.current(group.token.lease_id) != group.token:
                raise CheckpointError(
                    f"pooled group {group.group_id} holds lease {group.token.lease_id}, "
                    "which the staleness gate does not have outstanding"
                )
            self._keep(group)
        self.counters = loaded.counters
        self._waited_step = loaded.waited_step

    # -- internals -------------------------------------------------------------------------

    def _current_token(self, group: Group) -> VersionToken:
        token = self._gate.current(group.token.lease_id)
        if token is None:
            raise ValueError(
                f"group {group.group_id}: lease {group.token.lease_id} is not outstanding "
                "(already trained, released, or never issued)"
            )
        return token

    def _settle(self, group: Group) -> Settled:
        return settle_failures(group, self._failed_samples, self._min_group)

    def _classify(self, settled: Settled, token: VersionToken) -> _Kind:
        group = settled.group
        if group is None:
            return "failed"
        rewards = group.rewards
        if self._filter and rewards and max(rewards) == min(rewards):
            return "filtered"
        return self._gate.fate(self.next_step, token, head_version=group.head_version)

    def _keep(self, group: Group) -> None:
        self._groups[group.token.lease_id] = group
        self._heads[group.token.lease_id] = group.head_version

    def _earliest(self) -> list[int]:
        """Lease ids of the ``batch_groups`` oldest kept groups (earliest deadline first)."""

        def key(lease_id: int) -> tuple[int, int, int]:
            return (self._groups[lease_id].token.version, self._heads[lease_id], lease_id)

        ordered = sorted(self._groups, key=key)
        if not self._group_by:
            return ordered[: self._batch]
        return cluster_by_key(
            ordered,
            self._batch,
            tier=lambda lease_id: self._groups[lease_id].token.version,
            key=lambda lease_id: self._groups[lease_id].baseline_key or f"\0{lease_id}",
        )

    def _blocking_deadline(
        self, step: int | None = None, chosen: list[int] | None = None
    ) -> int | None:
        if not self._gate.waits_for_stragglers:
            return None
        step = self.next_step if step is None else step
        chosen = self._earliest() if chosen is None else chosen
        return self._gate.blocking_deadline(step, [self._groups[i].token for i in chosen])

    def _in_flight(self, *, up_to: int) -> list[VersionToken]:
        return [
            tok
            for tok in self._gate.outstanding_tokens()
            if tok.lease_id not in self._groups
            and tok.max_step is not None
            and tok.max_step <= up_to
        ]

    def _sweep(self, step: int) -> list[PoolEvent]:
        """Drop or requeue kept groups that are overdue at ``step``."""
        events: list[PoolEvent] = []
        for lease_id in sorted(self._groups):
            group = self._groups[lease_id]
            fate = self._gate.fate(step, group.token, head_version=self._heads[lease_id])
            if fate is Fate.TRAIN:
                continue
            if fate is Fate.DROP:
                del self._groups[lease_id], self._heads[lease_id]
                events.append(self._drop(group, group.token, step))
            else:
                events.append(self._requeue(group, group.token, step))
                new = self._gate.current(lease_id) or group.token
                self._groups[lease_id] = msgspec.structs.replace(group, token=new)
        return events

    def _newly_overdue(self, step: int) -> list[PoolEvent]:
        """In-flight leases whose last step was ``step`` (drop and requeue modes only)."""
        action = self._gate.on_overdue
        if action == "wait":
            return []
        return [
            LeaseOverdue(token=tok, step=step + 1, action=action)
            for tok in self._gate.overdue_outstanding(step + 1, exclude=self._groups)
            if tok.max_step == step
        ]

    def _pooled(self, settled: Settled, original: Group, token: VersionToken) -> GroupPooled:
        """The event of a kept group, counting its dropped and zeroed samples."""
        c = self.counters
        c.partial_groups += bool(settled.dropped or settled.zeroed)
        c.dropped_samples += len(settled.dropped)
        c.zeroed_samples += len(settled.zeroed)
        group = self._groups[token.lease_id]
        return GroupPooled(
            group_id=group.group_id,
            item_key=group.item_key,
            token=token,
            head_version=self._heads[token.lease_id],
            pool_size=self.size,
            samples=len(group.trajectories),
            dropped=[str(r) for r in settled.dropped],
            zeroed=[str(r) for r in settled.zeroed],
            degraded=settled.scored < min(self._min_group, len(original.trajectories)),
        )

    def _fail(self, group: Group, token: VersionToken) -> GroupFailed:
        self._gate.release(token)
        self.counters.failed_groups += 1
        reasons = sorted({str(t.failure) for t in group.trajectories if not t.ok})
        return GroupFailed(
            group_id=group.group_id, item_key=group.item_key, token=token, reasons=reasons
        )

    def _filter_out(self, group: Group, token: VersionToken) -> GroupFiltered:
        self._gate.release(token)
        self.counters.filtered_zero_variance += 1
        reward = group.rewards[0]
        return GroupFiltered(
            group_id=group.group_id, item_key=group.item_key, token=token, reward=reward
        )

    def _drop(self, group: Group, token: VersionToken, step: int) -> GroupDropped:
        self._gate.drop(token)
        self.counters.dropped_overdue += 1
        return GroupDropped(
            group_id=group.group_id,
            item_key=group.item_key,
            token=token,
            head_version=group.head_version,
            step=step,
        )

    def _requeue(self, group: Group, token: VersionToken, step: int) -> GroupRequeued:
        new = self._gate.requeue(token)
        self.counters.requeued += 1
        return GroupRequeued(
            group_id=group.group_id,
            item_key=group.item_key,
            old_token=token,
            token=new,
            head_version=group.head_version,
            step=step,
        )
