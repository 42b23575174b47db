"""``nexrl-async run``: open the run folder, run the engine under signal handling, close it.

SIGTERM and the first SIGINT (Ctrl-C) stop gracefully when ``checkpoint.on_sigterm`` is on:
the running train step finishes, a checkpoint is written, then the run stops; a second signal
cancels at once. Cancelling the root task group makes workers abort their requests and the
fleet stop its servers (shielded, with a grace period); the ledger and metrics are flushed and
closed before the process exits (``nexrl-async run`` exits 143 after SIGTERM, 130 after
SIGINT). ``run.max_wall_s`` stops the same graceful way. The run's end is recorded as
a ``run_finished`` event.

``resume`` (``--resume``): ``auto`` continues from the newest checkpoint of the run folder (or
starts fresh when it has none), anything else names a checkpoint folder (``engine.resume``).

Before anything is started or written, :func:`~nexrl_async.engine.startup.preflight_run` checks
what ``nexrl-async check`` checks. Signals are handled when the run owns the main thread; a run
in another thread (the Python API under a running event loop) is stopped through its
``observer`` instead.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio
from anyio import CancelScope
from anyio.abc import TaskStatus
from loguru import logger

from nexrl_async.config.loader import LoadedRecipe, load_recipe
from nexrl_async.core.children import TRAINER_MODULE, early_child
from nexrl_async.core.errors import TrainError
from nexrl_async.core.process import mark_unsafe_teardown
from nexrl_async.engine.context import RunContext, open_run, output_dir
from nexrl_async.engine.loop import StopRequest, run_engine
from nexrl_async.engine.parts import TrainerFactory
from nexrl_async.engine.resume import Resume, abandon_newer, check_resumable, find_checkpoint
from nexrl_async.engine.startup import preflight_run
from nexrl_async.obs.ledger import RunFinished, RunResumed, RunStarted, Trained, read_events
from nexrl_async.obs.logs import setup_logging
from nexrl_async.obs.rundir import RunDir
from nexrl_async.train.ranks.follower import run_follower
from nexrl_async.train.ranks.handle import make_trainer
from nexrl_async.train.ranks.remote_main import serve_socket
from nexrl_async.train.ranks.topology import Topology, open_process_groups

ANYIO_WORKER = "AnyIO worker thread"
"""The name anyio gives the threads of ``anyio.to_thread.run_sync``."""

StopFn = Callable[[str], None]
"""Asks the run to stop gracefully with a reason (call it on the run's event loop)."""


class RunObserver(Protocol):
    """Something that watches a run from inside (the Python API's callbacks)."""

    async def run_watch(
        self, ctx: RunContext, stop: StopFn, *, task_status: TaskStatus[None]
    ) -> None:
        """A task of the run's root group, started before the engine (``task_status.started()``
        once it is set up) and cancelled when the run ends: ``ctx`` holds the run's metrics
        hub and ledger; ``stop(reason)`` ends the run gracefully (checkpoint first) once its
        trainer loop runs, and cancels it before that."""


def run_recipe(
    recipe: LoadedRecipe,
    *,
    output: Path | None = None,
    trainer_factory: TrainerFactory | None = None,
    resume: str | None = None,
    observer: RunObserver | None = None,
) -> str:
    """Run ``recipe`` to its end and return why it ended; raises on failure.

    Under ``torchrun`` with more than one process, rank 0 runs the engine with a trainer handle
    that drives every rank, and the other ranks serve its commands until it shuts them down
    (they return ``"follower"``).
    """
    topology = Topology.from_env()
    if not topology.distributed:
        # a trainer process forked now, before the event loop and its threads, needs no imports
        process = recipe.config.trainer.process and trainer_factory is None
        with early_child(TRAINER_MODULE, serve_socket, enabled=process):
            return _run_rank0(recipe, output, trainer_factory, resume, observer)
    with open_process_groups(recipe.config.trainer) as groups:
        if groups.rank != 0:
            setup_logging(level="WARNING", rank=groups.rank, world_size=groups.world_size)
            code = run_follower(recipe.config, recipe.base_dir, groups)
            if code != 0:
                raise TrainError(f"rank {groups.rank} stopped after a failure (see rank 0)")
            return "follower"
        factory = trainer_factory or functools.partial(make_trainer, groups=groups)
        return _run_rank0(recipe, output, factory, resume, observer)


def _run_rank0(
    recipe: LoadedRecipe,
    output: Path | None,
    trainer_factory: TrainerFactory | None,
    resume: str | None,
    observer: RunObserver | None = None,
) -> str:
    preflight_run(recipe)
    threads_before: set[object] = set(threading.enumerate())  # a caller's threads are not ours
    checkpoints = RunDir(output_dir(recipe, output)).checkpoints_dir
    found = find_checkpoint(checkpoints, resume) if resume is not None else None
    point = Resume.load(found) if found is not None else None
    if point is not None:
        config = RunDir(output_dir(recipe, output)).config_path
        check_resumable(load_recipe(config).config, recipe.config)
    ctx = open_run(recipe, output, resume=resume is not None, resumed_from=found)
    if resume is not None and point is None:
        logger.info("--resume {}: no checkpoint in {}, starting fresh", resume, checkpoints)
    if point is not None:
        abandon_newer(ctx.run_dir.checkpoints_dir, point.step)
    outcome = {"reason": "error"}
    steps = 0
    try:
        anyio.run(_main, ctx, outcome, trainer_factory, point, observer)
    finally:
        steps = _steps_done(ctx)  # reads the whole event log: once
        ctx.ledger.emit(RunFinished(reason=outcome["reason"], step=steps))
        ctx.close()
        _let_go_of_stuck_user_code(ignore=threads_before)
    logger.info("run {} ({}) in {}", outcome["reason"], steps, ctx.run_dir.root)
    return outcome["reason"]


async def _main(
    ctx: RunContext,
    outcome: dict[str, str],
    trainer_factory: TrainerFactory | None,
    resume: Resume | None,
    observer: RunObserver | None = None,
) -> None:
    stop = StopRequest()
    async with anyio.create_task_group() as tg:

        def stop_run(reason: str) -> None:
            if not stop.request(reason):
                outcome["reason"] = reason
                tg.cancel_scope.cancel()

        if observer is not None:
            await tg.start(observer.run_watch, ctx, stop_run)
        if threading.current_thread() is threading.main_thread():
            on_sigterm = ctx.cfg.checkpoint.on_sigterm
            tg.start_soon(_watch_signals, tg.cancel_scope, stop, outcome, on_sigterm)
        if ctx.cfg.run.max_wall_s is not None:
            tg.start_soon(_watch_wall, tg.cancel_scope, stop, outcome, ctx.cfg.run.max_wall_s)
        outcome["reason"] = await run_engine(
            ctx, trainer_factory=trainer_factory, stop=stop, resume=resume
        )
        tg.cancel_scope.cancel()


async def _watch_signals(
    scope: CancelScope, stop: StopRequest, outcome: dict[str, str], graceful_sigterm: bool
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            reason = f"interrupted ({name})"
            outcome["reason"] = reason
            graceful = graceful_sigterm and stop.reason is None
            if graceful and stop.request(reason):
                logger.warning("{} received: stopping after a checkpoint", name)
                continue
            logger.warning("{} received: stopping the run", name)
            scope.cancel()
            return


async def _watch_wall(
    scope: CancelScope, stop: StopRequest, outcome: dict[str, str], max_wall_s: float
) -> None:
    await anyio.sleep(max_wall_s)
    logger.warning("run.max_wall_s = {} reached: stopping after a checkpoint", max_wall_s)
    outcome["reason"] = "max_wall_s"
    if not stop.request("max_wall_s"):
        scope.cancel()


def _steps_done(ctx: RunContext) -> int:
    """Steps done by the end of this process (counted from its resume point, if any)."""
    try:
        events = read_events(ctx.run_dir.events_path)
    except Exception:  # noqa: BLE001 - a summary number; never mask the run's own outcome
        return 0
    starts = [i for i, e in enumerate(events) if isinstance(e, RunStarted)]
    steps = 0
    for event in events[starts[-1] if starts else 0 :]:
        if isinstance(event, RunResumed):
            steps = event.step
        elif isinstance(event, Trained):
            steps = max(steps, event.step + 1)
    return steps


def _let_go_of_stuck_user_code(grace_s: float = 1.0, ignore: set[object] | None = None) -> None:
    """User code that outlived its timeout (a sync evaluator stuck in a worker thread) must not
    keep the process alive: interpreter shutdown would join those threads forever. Warn, and
    make the process end with ``os._exit`` (``core.process.exit_process``)."""
    deadline = time.monotonic() + grace_s
    stuck = []
    for thread in threading.enumerate():
        if thread.name == ANYIO_WORKER and thread is not threading.current_thread():
            if ignore is not None and thread in ignore:
                continue
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread)
    if stuck:
        logger.warning(
            "{} worker thread(s) still run user code that timed out; the process will not wait "
            "for them",
            len(stuck),
        )
        mark_unsafe_teardown("user code stuck in worker threads")
