"""The engine's main loop: one root task group, rollout workers streaming, one trainer coroutine.

What each task waits on:
- rollout workers (``rollout.workers`` tasks): a lease at the staleness gate, then the
  inference fleet (per-server concurrency caps), then pool capacity;
- the trainer coroutine: the batch of its step (and stragglers the staleness bound needs), then
  the train step in a worker thread (rollouts keep streaming), then the weight publication
  (servers held, weights loaded and verified), then validation when due;
- the fleet's supervisors: server processes and health probes (inside ``open_fleet``).

Shutdown: the run ends when the trainer returns (total steps reached, data exhausted); it cancels
the root group, workers abort their requests, ``open_fleet`` stops the servers in shielded
scopes. A signal or a failing task cancels the same way.
"""

from __future__ import annotations

import anyio
from anyio.abc import TaskGroup
from loguru import logger

from nexrl_async.engine.context import RunContext
from nexrl_async.engine.flow import Flow
from nexrl_async.engine.parts import Parts, TrainerFactory, open_parts
from nexrl_async.engine.stats import StepClock, batch_metrics
from nexrl_async.engine.validator import due, validate
from nexrl_async.obs.ledger import Published, Validated


async def run_engine(ctx: RunContext, *, trainer_factory: TrainerFactory | None = None) -> str:
    """Run the recipe to its end; return why it ended (``completed``, ``data_exhausted``).

    ``trainer_factory`` replaces the recipe's trainer (benchmarks simulate the train step).
    """
    parts_cm = open_parts(ctx, trainer_factory=trainer_factory)
    async with parts_cm as parts, anyio.create_task_group() as tg:
        pending = await _validate(ctx, parts, step=0, final=False)
        _start_rollouts(tg, parts)
        reason = await _train(ctx, parts, pending)
        tg.cancel_scope.cancel()
    return reason


def _start_rollouts(tg: TaskGroup, parts: Parts) -> None:
    for index in range(parts.cfg.rollout.workers):
        tg.start_soon(_run_rollout_worker, parts.flow, parts, name=f"rollout worker {index}")


async def _run_rollout_worker(flow: Flow, parts: Parts) -> None:
    while (admitted := await flow.admit()) is not None:
        token, item = admitted
        group_id = f"g{token.lease_id}"
        flow.note_admitted(token, item, group_id)
        try:
            group = await parts.worker.run_group(item, token, group_id=group_id)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await flow.release(token)
            raise
        await flow.put(group)


async def _train(ctx: RunContext, parts: Parts, pending: dict[str, float]) -> str:
    cfg, flow, clock = ctx.cfg, parts.flow, StepClock()
    step = flow.gate.next_step
    while cfg.run.total_steps is None or step < cfg.run.total_steps:
        wait_start = anyio.current_time()
        batch = await flow.take(step)
        if batch is None:
            return "data_exhausted"
        metrics = {"pipeline/batch_wait_s": anyio.current_time() - wait_start}
        metrics.update(await parts.train_step(batch))
        published = await parts.publisher.publish(step + 1)
        await flow.advance(step + 1)
        ctx.ledger.emit(
            Published(
                version=step + 1, transport=cfg.weights.transport, bytes=published.bytes,
                transfer_s=published.transfer_s, pause_s=published.pause_s,
                servers=list(parts.fleet.urls),
            )
        )  # fmt: skip
        metrics.update(batch_metrics(batch), **parts.pipeline_metrics(clock))
        metrics.update(
            {"weights/publish_s": published.total_s, "weights/pause_s": published.pause_s}
        )
        metrics.update({"weights/bytes": float(published.bytes), **pending})
        step += 1
        pending = await _validate(ctx, parts, step=step, final=False)
        elapsed = clock.lap()
        metrics["timing/step_s"] = elapsed
        metrics["throughput/tokens_per_s"] = metrics.pop("rollout/generated_tokens") / elapsed
        ctx.metrics.log(batch.step, metrics)
        parts.progress(step, metrics)
        await parts.dump_samples(batch)
    final = pending or await _validate(ctx, parts, step=step, final=True)
    if final:
        ctx.metrics.log(step, final)
    return "completed"


async def _validate(ctx: RunContext, parts: Parts, *, step: int, final: bool) -> dict[str, float]:
    val = ctx.cfg.validation
    if not due(val, step, final=final):
        return {}
    metrics = await validate(
        parts.val_worker, parts.val_items, version=parts.flow.gate.version,
        concurrency=ctx.cfg.rollout.workers,
    )  # fmt: skip
    ctx.ledger.emit(Validated(step=step, metrics=dict(metrics)))
    logger.info("validation at step {}: reward {:.3f}", step, metrics["val/reward_mean"])
    return metrics
