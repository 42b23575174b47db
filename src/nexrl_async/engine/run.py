"""``nexrl-async run``: open the run folder, run the engine under signal handling, close it.

SIGINT and SIGTERM cancel the root task group: workers abort their requests, the fleet stops
its servers (shielded, with a grace period), and the ledger and metrics are flushed and closed
before the process exits. The run's end is recorded as a ``run_finished`` event.
"""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
from anyio import CancelScope
from loguru import logger

from nexrl_async.config.loader import LoadedRecipe
from nexrl_async.config.preflight import preflight
from nexrl_async.engine.context import RunContext, open_run
from nexrl_async.engine.loop import run_engine
from nexrl_async.engine.parts import TrainerFactory
from nexrl_async.obs.ledger import RunFinished


def run_recipe(
    recipe: LoadedRecipe,
    *,
    output: Path | None = None,
    trainer_factory: TrainerFactory | None = None,
) -> str:
    """Run ``recipe`` to its end and return why it ended; raises on failure."""
    preflight(recipe)
    ctx = open_run(recipe, output, resume=False)
    outcome = {"reason": "error"}
    try:
        anyio.run(_main, ctx, outcome, trainer_factory)
    finally:
        ctx.ledger.emit(RunFinished(reason=outcome["reason"], step=_steps_done(ctx)))
        ctx.close()
    logger.info("run {} ({}) in {}", outcome["reason"], _steps_done(ctx), ctx.run_dir.root)
    return outcome["reason"]


async def _main(
    ctx: RunContext, outcome: dict[str, str], trainer_factory: TrainerFactory | None
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, tg.cancel_scope, outcome)
        outcome["reason"] = await run_engine(ctx, trainer_factory=trainer_factory)
        tg.cancel_scope.cancel()


async def _watch_signals(scope: CancelScope, outcome: dict[str, str]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            logger.warning("{} received: stopping the run", name)
            outcome["reason"] = f"interrupted ({name})"
            scope.cancel()
            return


def _steps_done(ctx: RunContext) -> int:
    from nexrl_async.obs.ledger import Trained, read_events

    try:
        trained = [e for e in read_events(ctx.run_dir.events_path) if isinstance(e, Trained)]
    except Exception:  # noqa: BLE001 - a summary number; never mask the run's own outcome
        return 0
    return max((e.step + 1 for e in trained), default=0)
