"""The parts of a run built while its inference servers start: the flow and the validation
items, then the start-up heap frozen out of the garbage collector's view.

``open_parts`` hands :class:`WhileServersStart` to ``open_fleet(while_starting=...)``: the
servers' processes are started first, so reading the data and the 0.2 s collection overlap the
servers' own start instead of preceding it.
"""

from __future__ import annotations

import gc

import anyio
import anyio.to_thread
import msgspec

from nexrl_async.core.records import DataItem
from nexrl_async.data import iterate_once, open_source
from nexrl_async.engine.breaker import FailureBreaker
from nexrl_async.engine.context import RunContext
from nexrl_async.engine.flow import Flow
from nexrl_async.engine.resume import Resume, restore_flow
from nexrl_async.pipeline.pool import TrajectoryPool
from nexrl_async.pipeline.staleness import StalenessGate


async def open_flow(ctx: RunContext, resume: Resume | None) -> Flow:
    """Data source, gate and pool behind one condition; on resume, their saved state."""
    cfg = ctx.cfg
    data = await anyio.to_thread.run_sync(lambda: open_source(cfg.data, base_dir=ctx.base_dir))
    gate = StalenessGate(cfg.staleness, batch_groups=cfg.pool.batch_groups)
    # DAPO's dynamic sampling is the pool's zero-variance filter
    zero_var = cfg.pool.filter_zero_variance or cfg.algorithm.dynamic_sampling
    pool = TrajectoryPool(
        msgspec.structs.replace(cfg.pool, filter_zero_variance=zero_var), gate=gate
    )
    flow = Flow(
        gate=gate, pool=pool, data=data, ledger=ctx.ledger, max_replays=cfg.data.max_replays,
        breaker=FailureBreaker(cfg.faults),
    )  # fmt: skip
    if resume is not None:
        restore_flow(flow, resume)
    return flow


def validation_items(ctx: RunContext) -> list[DataItem]:
    val = ctx.cfg.validation
    if val.data is None:
        return []
    return iterate_once(val.data, ctx.base_dir, val.max_items)


class WhileServersStart:
    """The parts built while the servers start: the flow (its data read in a worker thread),
    the validation items, then the heap frozen (see :meth:`__call__`)."""

    def __init__(self, ctx: RunContext, resume: Resume | None) -> None:
        self.ctx, self.resume = ctx, resume
        self._flow: Flow | None = None
        self.val_items: list[DataItem] = []

    @property
    def flow(self) -> Flow:
        assert self._flow is not None, "built while the servers start"
        return self._flow

    async def __call__(self) -> None:
        self._flow = await open_flow(self.ctx, self.resume)
        self.val_items = await anyio.to_thread.run_sync(validation_items, self.ctx)
        # torch + transformers leave ~400k tracked objects; full collections over them froze
        # the loop for 0.5-1 s mid-run (benchmarks/pipeline.py), so they leave the GC's view.
        # Done here, the 0.2 s the collection takes overlaps the servers' start.
        gc.collect()
        gc.freeze()
