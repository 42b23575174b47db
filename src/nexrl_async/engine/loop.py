"""The engine's main loop: one root task group, rollout workers streaming, one trainer coroutine.

What each task waits on:
- rollout workers (``rollout.workers`` tasks): a lease at the staleness gate, then the
  inference fleet (per-server concurrency caps), then pool capacity;
- the trainer coroutine: the batch of its step (and stragglers the staleness bound needs), then
  the train step (a trainer process: its socket; else a worker thread; rollouts keep
  streaming), then the weight publication (servers held, weights loaded and verified), then
  validation when due. Where the publisher can fix the step's weights at once
  (``Publisher.capture``: shared memory, in place, a trainer process that stages after each
  step) and no validation, checkpoint, stop or end falls on that boundary, the publication
  runs beside the next step instead (its metrics land in that step's row, with
  ``weights/beside``); the next boundary waits for it. There the step's row, progress line
  and sample dump are written once the next step is sent (:class:`_StepReport`);
- the fleet's supervisors: server processes and health probes (inside ``open_fleet``);
- the watchdog (``engine.watchdog``): samples finishing while requests are pending.

Checkpoints: after every ``checkpoint.every_steps``-th step the trainer coroutine saves one
(rollouts keep streaming); at the end a last one (``at_end``) and the HF export (``export_hf``).

Shutdown: the run ends when the trainer returns (total steps reached, data exhausted); it cancels
the root group, workers abort their requests, ``open_fleet`` stops the servers in shielded
scopes. A failing task cancels the same way, and so do SIGINT and a second signal. A graceful
stop (:class:`StopRequest`: SIGTERM with ``checkpoint.on_sigterm``, ``run.max_wall_s``) lets the
running train step and its publication finish, stops waiting for the next batch (or for
validation), saves a checkpoint, then ends the run the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup
from loguru import logger

from nexrl_async.core.errors import RolloutError
from nexrl_async.core.records import TrainBatch
from nexrl_async.engine.context import RunContext
from nexrl_async.engine.flow import Flow
from nexrl_async.engine.parts import Parts, TrainerFactory, open_parts
from nexrl_async.engine.resume import Resume
from nexrl_async.engine.stats import StepClock, batch_metrics
from nexrl_async.engine.validator import due, validate, validation_concurrency
from nexrl_async.engine.watchdog import run_watchdog
from nexrl_async.obs.ledger import Published, Validated


class StopRequest:
    """A graceful stop: finish the running step, checkpoint, end the run.

    :meth:`request` cancels only the waits wrapped in :meth:`interruptible` (the next batch,
    validation); a train step, a publication and a checkpoint always run to their end.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.listening = False
        """Whether a trainer loop honours requests (before that, a signal cancels the run)."""
        self._scopes: set[CancelScope] = set()

    def request(self, reason: str) -> bool:
        """Ask the run to stop; ``False`` when no trainer loop listens yet."""
        if not self.listening:
            return False
        self.reason = self.reason or reason
        for scope in self._scopes:
            scope.cancel()
        return True

    @contextmanager
    def interruptible(self) -> Iterator[CancelScope]:
        with CancelScope() as scope:
            if self.reason is not None:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)


async def run_engine(
    ctx: RunContext,
    *,
    trainer_factory: TrainerFactory | None = None,
    stop: StopRequest | None = None,
    resume: Resume | None = None,
) -> str:
    """Run the recipe to its end; return why it ended (``completed``, ``data_exhausted``, or
    the reason of a graceful stop).

    ``trainer_factory`` replaces the recipe's trainer (benchmarks simulate the train step).
    ``resume`` continues from a checkpoint (``engine.resume``).
    """
    stop = stop or StopRequest()
    parts_cm = open_parts(ctx, trainer_factory=trainer_factory, resume=resume)
    async with parts_cm as parts, anyio.create_task_group() as tg:
        pending: dict[str, float] = {}
        stop.listening = True
        tg.start_soon(run_watchdog, parts.fleet, parts.events, ctx.cfg.faults, name="watchdog")
        if ctx.cfg.inference.batch_first_turns:
            tg.start_soon(parts.generator.serve, name="first-turn batcher")
        if resume is None:
            with stop.interruptible():
                pending = await _validate(ctx, parts, step=0, final=False)
        _start_rollouts(tg, parts)
        reason = await _train(ctx, parts, pending, stop)
        await _wrap_up(parts, reason)
        tg.cancel_scope.cancel()
    return reason


async def _wrap_up(parts: Parts, reason: str) -> None:
    """The last checkpoint (graceful stop, or ``at_end``) and the final HF export.

    Raises:
        RolloutError: the data ran out before the first step (nothing trained, nothing
            exported: an untrained model must not look like a result).
    """
    step = parts.flow.gate.next_step
    if reason == "data_exhausted" and step == 0:
        flow = parts.flow
        raise RolloutError(
            f"the data ran out before the first training step: {flow.counts['GroupFailed']} "
            f"groups failed ({flow.breaker.describe()}), {flow.abandoned} items abandoned"
        )
    await parts.reporting.dump_final()
    finished = reason in ("completed", "data_exhausted")
    if not finished or parts.cfg.checkpoint.at_end:
        await parts.checkpointer.save(step)
    if finished:
        await parts.checkpointer.export_final(parts.ctx.run_dir.root / "final")


def _start_rollouts(tg: TaskGroup, parts: Parts) -> None:
    for index in range(parts.cfg.rollout.workers):
        tg.start_soon(_run_rollout_worker, parts.flow, parts, name=f"rollout worker {index}")


async def _run_rollout_worker(flow: Flow, parts: Parts) -> None:
    while (admitted := await flow.admit()) is not None:
        token, item = admitted
        flow.note_admitted(token, item)
        group = None
        try:
            with flow.lease_scope(token):
                group = await parts.worker.run_group(item, token, group_id=flow.group_id(token))
        finally:
            if group is None:  # cancelled (the run ends, or the lease went overdue): replay
                with anyio.CancelScope(shield=True):
                    await flow.release(token)
        if group is not None:
            await flow.put(group)


async def _train(
    ctx: RunContext, parts: Parts, pending: dict[str, float], stop: StopRequest
) -> str:
    """The trainer loop; a publication that runs beside the next step lives in ``beside``'s
    task group, so every way out of the loop waits for it (and fails with it)."""
    async with anyio.create_task_group() as beside:
        reason = await _train_loop(ctx, parts, pending, stop, beside)
    return reason


async def _train_loop(
    ctx: RunContext,
    parts: Parts,
    pending: dict[str, float],
    stop: StopRequest,
    beside: TaskGroup,
) -> str:
    cfg, clock = ctx.cfg, StepClock()
    step = parts.flow.gate.next_step
    running: _Beside | None = None
    report = _StepReport(None, None)  # the last step's, written once this step's batch is sent
    try:
        while cfg.run.total_steps is None or step < cfg.run.total_steps:
            wait_start = anyio.current_time()
            batch: TrainBatch | None = None
            with stop.interruptible():
                batch = await parts.flow.take(step, on_wait=report.start)
                if batch is None:
                    return "data_exhausted"
            if batch is None:
                return stop.reason or "stopped"
            metrics = {"pipeline/batch_wait_s": anyio.current_time() - wait_start, **pending}
            metrics.update(await parts.train_step(batch, on_sent=report.start))
            await report.wait()
            if running is not None:  # the previous version, published beside this step
                metrics.update(await running.wait())
            step += 1
            metrics.update(parts.pipeline_metrics(clock))
            running = None
            if _may_publish_beside(parts, stop, step) and parts.publisher.capture(step):
                running = _Beside(step)
                beside.start_soon(running.run, ctx, parts, name=f"publish v{step}")
            else:
                metrics.update(await _publish(ctx, parts, step))
            pending = {}
            with stop.interruptible():
                pending = await _validate(ctx, parts, step=step, final=False)
            metrics["timing/step_s"] = clock.lap()
            report = _step_report(ctx, parts, batch, metrics, beside)
            if running is None:  # a boundary that waits: validation, checkpoint, stop, the end
                await report.wait()
            if parts.checkpointer.due(step):
                await parts.checkpointer.save(step)
            if stop.reason is not None:
                return stop.reason
    finally:
        with anyio.CancelScope(shield=True):
            await report.wait()
    final = pending or await _validate(ctx, parts, step=step, final=True)
    if final:
        ctx.metrics.log(step, final)
    return "completed"


def _may_publish_beside(parts: Parts, stop: StopRequest, step: int) -> bool:
    """Whether version ``step`` may publish beside the next step: not when anything at this
    step boundary needs the servers on it (validation, a checkpoint, the end, a stop)."""
    cfg = parts.cfg
    last = cfg.run.total_steps is not None and step >= cfg.run.total_steps
    return not (
        last or stop.reason is not None or parts.checkpointer.due(step)
        or due(cfg.validation, step, final=False)
    )  # fmt: skip


class _Beside:
    """A publication running beside the next train step (``Publisher.capture`` fixed its
    weights): the gate advances when it completes; the next boundary waits for it."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.metrics: dict[str, float] = {}
        self._done = anyio.Event()

    async def run(self, ctx: RunContext, parts: Parts) -> None:
        try:
            self.metrics = await _publish(ctx, parts, self.version)
            self.metrics["weights/beside"] = 1.0
        finally:
            self._done.set()

    async def wait(self) -> dict[str, float]:
        await self._done.wait()
        return self.metrics


class _StepReport:
    """A step's metric row, progress line and sample dump (:func:`_step_report`). Where the
    next step may be sent at once (the publication runs beside it), they are written in the
    background from the moment the next batch is on its way (or the loop has to wait for it),
    off the trainer's critical path; the loop waits for them after the next step's reply, so
    rows stay in step order."""

    def __init__(self, write: Callable[[], Awaitable[None]] | None, tg: TaskGroup | None) -> None:
        self._write = write
        self._tg = tg
        self._done = anyio.Event()
        if write is None:
            self._done.set()

    def start(self) -> None:
        """Write them now, in the background (once)."""
        if self._write is not None and self._tg is not None:
            write, self._write = self._write, None
            self._tg.start_soon(self._run, write, name="step report")

    async def wait(self) -> None:
        """Write them here if they have not started, and wait until they are written."""
        if self._write is not None:
            write, self._write = self._write, None
            await self._run(write)
        await self._done.wait()

    async def _run(self, write: Callable[[], Awaitable[None]]) -> None:
        try:
            await write()
        finally:
            self._done.set()


def _step_report(
    ctx: RunContext, parts: Parts, batch: TrainBatch, metrics: dict[str, float], tg: TaskGroup
) -> _StepReport:
    async def write() -> None:
        metrics.update(batch_metrics(batch))
        tokens = metrics.pop("rollout/generated_tokens")
        metrics["throughput/tokens_per_s"] = tokens / metrics["timing/step_s"]
        ctx.metrics.log(batch.step, metrics)
        parts.reporting.progress(batch.step + 1, metrics)
        await parts.reporting.dump_samples(batch)

    return _StepReport(write, tg)


async def _publish(ctx: RunContext, parts: Parts, version: int) -> dict[str, float]:
    """Publish ``version`` (the publisher advances the gate to it once every live server has
    it, and the gate admits on it); its metrics."""
    published = await parts.publisher.publish(version)
    ctx.ledger.emit(
        Published(
            version=version, transport=parts.publisher.transport.name, bytes=published.bytes,
            transfer_s=published.transfer_s, pause_s=published.pause_s,
            servers=list(parts.fleet.urls),
        )
    )  # fmt: skip
    return {
        "weights/publish_s": published.total_s,
        "weights/pause_s": published.pause_s,
        "weights/hold_s": published.hold_s,
        "weights/skipped": float(published.skipped),
        "weights/bytes": float(published.bytes),
        "weights/beside": 0.0,
    }


async def _validate(ctx: RunContext, parts: Parts, *, step: int, final: bool) -> dict[str, float]:
    val = ctx.cfg.validation
    if not due(val, step, final=final):
        return {}
    metrics = await validate(
        parts.val_worker, parts.val_items, version=parts.flow.gate.version,
        concurrency=validation_concurrency(ctx.cfg), loss=parts.reporting.validation_loss,
        failed_samples=val.failed_samples,
    )  # fmt: skip
    ctx.ledger.emit(Validated(step=step, metrics=dict(metrics)))
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("val/reward_mean", "val/loss")}
    logger.info("validation at step {}: {}", step, shown)
    return metrics
