"""Property tests: the staleness contract under random interleavings (docs/architecture.md §3).

A small simulator drives a real gate and pool the way the engine does: workers lease, finish
in any order (a group's head version is anywhere between its lease version and the fleet's),
fail or are abandoned; a worker whose put is refused holds its group and retries; the trainer
takes batches whenever it likes and publishes the versions it produced. Every consumed group is
checked against the bound, and in ``wait`` the gate's invariant (I) — the proof in
``pipeline/staleness.py`` — is checked after every action.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from nexrl_async.config.pipeline import PoolConfig, StalenessConfig
from nexrl_async.core.records import Group, VersionToken
from nexrl_async.pipeline.pool import (
    GroupDropped,
    GroupRequeued,
    LeaseOverdue,
    PoolEvent,
    TrajectoryPool,
)
from nexrl_async.pipeline.staleness import StalenessGate

GroupFactory = Callable[..., Group]

OPS = (
    ["lease"] * 4 + ["finish"] * 4 + ["train"] * 3 + ["publish"] * 2 + ["fail", "abandon", "retry"]
)


@dataclass
class Sim:
    gate: StalenessGate
    pool: TrajectoryPool
    make_group: GroupFactory
    inflight: dict[int, tuple[VersionToken, int]] = field(default_factory=dict)
    """lease id -> (current token, version of the lease that started the work)."""
    held: list[Group] = field(default_factory=list)
    consumed: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    requeued: set[int] = field(default_factory=set)
    trace: list[Any] = field(default_factory=list)

    @property
    def k(self) -> int | None:
        return self.gate.max_staleness

    def act(self, op: str, arg: int) -> None:
        getattr(self, f"_{op}")(arg)
        self.check_invariant()

    # -- actions ---------------------------------------------------------------------------

    def _lease(self, arg: int) -> None:
        tok = self.gate.try_lease()
        self.trace.append(tok)
        if tok is not None:
            self.inflight[tok.lease_id] = (tok, tok.version)

    def _pick(self, arg: int) -> int | None:
        """Mostly the newest lease, so that old ones straggle; any lease one time in five."""
        if not self.inflight:
            return None
        ids = sorted(self.inflight)
        return ids[arg % len(ids)] if arg % 5 == 0 else ids[-1]

    def _finish(self, arg: int) -> None:
        lease_id = self._pick(arg)
        if lease_id is None:
            return
        tok, start = self.inflight.pop(lease_id)
        head = start + arg // 7 % (self.gate.version - start + 1)
        rewards = (1.0, 1.0) if arg % 11 == 0 else (float(arg % 3), 0.5)
        self._offer(self.make_group(tok, head=head, rewards=rewards))

    def _fail(self, arg: int) -> None:
        lease_id = self._pick(arg)
        if lease_id is not None:
            tok, start = self.inflight.pop(lease_id)
            self._offer(self.make_group(tok, head=start, failed=True))

    def _abandon(self, arg: int) -> None:
        lease_id = self._pick(arg)
        if lease_id is not None:
            tok, _ = self.inflight.pop(lease_id)
            self.gate.release(tok)

    def _retry(self, arg: int) -> None:
        held, self.held = self.held, []
        for group in held:
            self._offer(group)

    def _publish(self, arg: int) -> None:
        if self.gate.version < self.gate.next_step:
            self.gate.advance(self.gate.version + 1)

    def _train(self, arg: int) -> None:
        step = self.pool.next_step
        out = self.pool.take_batch(step)
        self.trace.append(out)
        self._events(out.events)
        if out.batch is None:
            return
        assert out.batch.step == step
        assert len(out.batch.groups) == self.gate.batch_groups
        for group in out.batch.groups:
            self.check_bound(step, group)
            self.consumed.add(group.token.lease_id)

    # -- plumbing --------------------------------------------------------------------------

    def _offer(self, group: Group) -> None:
        if not self.pool.can_put(group):
            self.held.append(group)
            return
        self._events(self.pool.put(group))

    def _events(self, events: list[PoolEvent]) -> None:
        self.trace.extend(events)
        for event in events:
            if isinstance(event, GroupDropped):
                assert self.gate.on_overdue != "wait" or event.head_version < event.token.version
                self.dropped.add(event.token.lease_id)
            elif isinstance(event, GroupRequeued):
                self.requeued.add(event.token.lease_id)
            elif isinstance(event, LeaseOverdue):
                assert self.gate.on_overdue != "wait", "wait never strands a lease"
                self._overdue_in_flight(event)

    def _overdue_in_flight(self, event: LeaseOverdue) -> None:
        entry = self.inflight.get(event.token.lease_id)
        if entry is None:
            return  # finished and held: the pool decides at put
        tok, start = entry
        if event.action == "drop":
            self.inflight.pop(tok.lease_id)
            self.gate.drop(tok)
            self.dropped.add(tok.lease_id)
        else:
            self.inflight[tok.lease_id] = (self.gate.requeue(tok), start)
            self.requeued.add(tok.lease_id)

    # -- checks ----------------------------------------------------------------------------

    def check_bound(self, step: int, group: Group) -> None:
        lease_id, head, k = group.token.lease_id, group.head_version, self.k
        assert lease_id not in self.consumed, "a lease was consumed twice"
        assert lease_id not in self.dropped, "a dropped group was consumed"
        if k is None:
            return
        assert group.token.max_step is not None
        assert step <= group.token.max_step
        if lease_id not in self.requeued:
            assert step - head <= k, f"step {step} consumed head {head} with k = {k}"
        if self.gate.mode == "sync":
            assert head == step, "sync must be exactly on-policy"

    def check_invariant(self) -> None:
        """(I): O(t) <= (t + 1 - n) * B for every t >= n - 1 (wait mode)."""
        gate, pool = self.gate, self.pool
        assert pool.size <= gate.outstanding
        if not gate.waits_for_stragglers:
            assert pool.size <= pool.capacity
            return
        n, b = gate.next_step, gate.batch_groups
        deadlines = sorted(t.max_step for t in gate.outstanding_tokens() if t.max_step is not None)
        for count, deadline in enumerate(deadlines, start=1):
            assert deadline >= n, "an outstanding lease is overdue"
            assert count <= (deadline + 1 - n) * b, "invariant (I) broken"

    def drain(self) -> None:
        """Stop leasing, let everything land, train: nothing may stay stuck (liveness)."""
        for _ in range(1000):
            for lease_id in sorted(self.inflight):
                self._finish(0)
                assert lease_id not in self.inflight
            self._retry(0)
            before = (self.pool.next_step, len(self.held), self.pool.size)
            self._train(0)
            self._publish(0)
            self.check_invariant()
            if (
                not self.inflight
                and (self.pool.next_step, len(self.held), self.pool.size) == before
            ):
                break
        assert not self.inflight
        assert not self.held, "a finished group could not be pooled"
        assert self.pool.size < self.gate.batch_groups, "a ready batch was not handed out"


@st.composite
def configs(draw: st.DrawFn) -> tuple[StalenessConfig, PoolConfig]:
    mode = draw(st.sampled_from(["sync", "batch-async", "batch-async", "fully-async"]))
    batch = draw(st.integers(1, 3))
    k = draw(st.integers(1, 3)) if mode == "batch-async" else None
    raw = {
        "mode": mode,
        "max_staleness": k,
        "max_inflight_groups": draw(st.none() | st.integers(batch, 4 * batch)),
        "on_overdue": draw(st.sampled_from(["wait", "wait", "drop", "requeue"])),
    }
    staleness = msgspec.convert(raw, StalenessConfig)
    pool = PoolConfig(
        batch_groups=batch,
        capacity_groups=draw(st.none() | st.integers(batch, 3 * batch)),
        filter_zero_variance=draw(st.booleans()),
    )
    return staleness, pool


@st.composite
def action_lists(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Uniformly random actions: hypothesis' shrinkable draws favour small values (oldest
    lease, first action), which rarely build the stragglers this test is about."""
    rng = draw(st.randoms(use_true_random=True))
    return [(rng.choice(OPS), rng.randrange(10_000)) for _ in range(rng.randint(20, 250))]


ops = action_lists()


def make_sim(staleness: StalenessConfig, pool_cfg: PoolConfig, make_group: GroupFactory) -> Sim:
    gate = StalenessGate(staleness, batch_groups=pool_cfg.batch_groups)
    return Sim(gate=gate, pool=TrajectoryPool(pool_cfg, gate=gate), make_group=make_group)


@settings(max_examples=300, deadline=None)
@given(cfg=configs(), actions=ops)
def test_every_consumed_group_respects_the_bound(
    make_group: GroupFactory,
    cfg: tuple[StalenessConfig, PoolConfig],
    actions: list[tuple[str, int]],
) -> None:
    sim = make_sim(*cfg, make_group)
    for op, arg in actions:
        sim.act(op, arg)
    sim.drain()


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 3), actions=ops)
def test_sync_is_exactly_on_policy(
    make_group: GroupFactory, batch: int, actions: list[tuple[str, int]]
) -> None:
    sim = make_sim(StalenessConfig(mode="sync"), PoolConfig(batch_groups=batch), make_group)
    for op, arg in actions:
        sim.act(op, arg)
        # Generation for step s + 1 starts only once version s + 1 is loaded.
        assert all(tok.version == sim.gate.version for tok, _ in sim.inflight.values())
    sim.drain()


@settings(max_examples=150, deadline=None)
@given(cfg=configs(), before=ops, after=ops)
def test_state_dict_round_trip_mid_run_continues_identically(
    make_group: GroupFactory,
    cfg: tuple[StalenessConfig, PoolConfig],
    before: list[tuple[str, int]],
    after: list[tuple[str, int]],
) -> None:
    sim = make_sim(*cfg, make_group)
    for op, arg in before:
        sim.act(op, arg)
    clone = make_sim(*cfg, make_group)
    clone.gate.load_state_dict(
        msgspec.msgpack.decode(msgspec.msgpack.encode(sim.gate.state_dict()))
    )
    clone.pool.load_state_dict(
        msgspec.msgpack.decode(msgspec.msgpack.encode(sim.pool.state_dict()))
    )
    for name in ("inflight", "held", "consumed", "dropped", "requeued"):
        setattr(clone, name, copy.deepcopy(getattr(sim, name)))
    sim.trace.clear()
    for op, arg in after:
        sim.act(op, arg)
        clone.act(op, arg)
    assert clone.trace == sim.trace
    assert clone.gate.state_dict() == sim.gate.state_dict()
    assert clone.pool.state_dict() == sim.pool.state_dict()
    assert clone.pool.metrics() == sim.pool.metrics()


def test_the_simulator_reaches_the_cases_the_properties_are_about(
    make_group: GroupFactory,
) -> None:
    """Guards the tests above against going vacuous: seeded runs must wait, drop, requeue,
    admit over capacity and strand nothing."""
    seen = {"waits": 0, "dropped": 0, "requeued": 0, "over_capacity": 0, "steps": 0}
    for seed in range(60):
        rng = random.Random(seed)
        action = ("wait", "drop", "requeue")[seed % 3]
        raw = {"max_staleness": 1 + seed % 2, "on_overdue": action}
        staleness = msgspec.convert(raw, StalenessConfig)
        pool_cfg = PoolConfig(batch_groups=1 + seed % 3, capacity_groups=1 + seed % 3)
        sim = make_sim(staleness, pool_cfg, make_group)
        for _ in range(150):
            sim.act(rng.choice(OPS), rng.randrange(10_000))
        sim.drain()
        c = sim.pool.counters
        for name, value in [
            ("waits", c.waits),
            ("dropped", c.dropped_overdue + sim.gate.counters.dropped),
            ("requeued", sim.gate.counters.requeued),
            ("over_capacity", c.over_capacity),
            ("steps", sim.pool.next_step),
        ]:
            seen[name] += value
    assert all(seen.values()), seen
