"""``train`` and ``train_async``: run a recipe from Python and get a :class:`RunResult` back.

``train`` blocks until the run ends. From a plain script it runs the engine on the calling
thread (SIGINT and SIGTERM stop it as they stop ``nexrl-async run``). Where an event loop
already runs in the calling thread (a notebook cell), the engine runs in a worker thread with an
event loop of its own while the caller waits; an interrupt there (Ctrl-C, the notebook's stop
button) asks for a graceful stop and keeps waiting for the checkpoint, a second one gives up
waiting (the run goes on stopping in its thread). ``await train_async(...)`` runs the engine in
a worker thread without blocking the caller's loop; cancelling it stops the run gracefully and
waits for that.

Every failure before the first step is a :class:`~nexrl_async.core.errors.ConfigError` (the
run's pre-flight, as ``nexrl-async check``), and leaves ``output`` reusable.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from nexrl_async.api.callbacks import Dispatcher, RunControl
from nexrl_async.api.objects import Registration
from nexrl_async.api.recipes import Overrides, RecipeLike, load_any
from nexrl_async.core.errors import CallbackError
from nexrl_async.engine.run import run_recipe
from nexrl_async.obs.metrics import read_metrics
from nexrl_async.obs.rundir import RunDir


@dataclass(frozen=True)
class RunResult:
    """How a run ended and what it measured (read from its ``metrics.jsonl``)."""

    run_dir: Path
    """The run folder."""
    reason: str
    """Why the run ended: ``completed``, ``data_exhausted``, ``max_wall_s``,
    ``stopped (<reason>)`` (a callback or :meth:`RunControl.stop`), ``interrupted (SIGINT)``."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last value of every metric (``nan`` where it was not finite)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every row of ``metrics.jsonl``, in order: ``{"step", "time", ...metrics}``."""

    @property
    def completed(self) -> bool:
        """The run trained all its steps (or all its data)."""
        return self.reason in ("completed", "data_exhausted")

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every row that has ``key``."""
        return [(int(row["step"]), _number(row[key])) for row in self.history if key in row]

    @classmethod
    def read(cls, run_dir: Path, reason: str) -> RunResult:
        path = RunDir(run_dir).metrics_path
        history = read_metrics(path) if path.is_file() else []
        final: dict[str, float] = {}
        for row in history:
            final.update({k: _number(v) for k, v in row.items() if k not in ("step", "time")})
        return cls(run_dir=run_dir, reason=reason, metrics=final, history=history)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def train(
    recipe: RecipeLike,
    *,
    output: str | os.PathLike[str],
    overrides: Overrides = None,
    callbacks: Sequence[Any] = (),
    resume: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> RunResult:
    """Train ``recipe`` into the run folder ``output``; block until the run ends.

    Args:
        recipe: a recipe TOML path, a mapping shaped like one, or a ``RecipeConfig``; its
            evaluator, tools, worker, data factories and ``prepare_batch`` may be Python objects,
            and a data section a list of rows (docs/api.md).
        output: the run folder (``--output``).
        overrides: ``{"dotted.path": value}``, as ``--set`` (values may be Python objects).
        callbacks: see :mod:`nexrl_async.api.callbacks`.
        resume: ``"auto"`` or a checkpoint folder, as ``--resume``.
        base_dir: the folder a mapping's relative paths and ``extends`` resolve against
            (default: the working folder).

    Raises:
        ConfigError: the recipe, or anything the pre-flight checks (nothing was started).
        CallbackError: a callback raised (the run was stopped gracefully first).
    """
    session = _Session(recipe, output, overrides, callbacks, resume, base_dir)
    if not _loop_running():
        return session.run()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexrl-train")
    try:
        return _wait(pool.submit(session.run), session)
    finally:
        pool.shutdown(wait=False)


async def train_async(
    recipe: RecipeLike,
    *,
    output: str | os.PathLike[str],
    overrides: Overrides = None,
    callbacks: Sequence[Any] = (),
    resume: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> RunResult:
    """:func:`train` in a worker thread, awaitable from any asyncio or trio loop.

    Cancelling the awaiting task stops the run gracefully and waits for it to end.
    """
    session = _Session(recipe, output, overrides, callbacks, resume, base_dir)
    try:
        return await anyio.to_thread.run_sync(session.run, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        session.control.stop("cancelled")
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(session.finished.wait)
        raise


class _Session:
    """One call's recipe, callbacks and control; :meth:`run` runs it (in any one thread)."""

    def __init__(
        self,
        recipe: RecipeLike,
        output: str | os.PathLike[str],
        overrides: Overrides,
        callbacks: Sequence[Any],
        resume: str | None,
        base_dir: str | os.PathLike[str] | None,
    ) -> None:
        self.recipe, self.overrides, self.resume, self.base_dir = (
            recipe,
            overrides,
            resume,
            base_dir,
        )
        self.run_dir = Path(output).expanduser().resolve()
        self.control = RunControl(self.run_dir)
        self.dispatcher = Dispatcher(list(callbacks), self.control)
        self.finished = threading.Event()

    def run(self) -> RunResult:
        registration = Registration()
        try:
            loaded = load_any(
                self.recipe, self.overrides, registration=registration, base_dir=self.base_dir
            )
            reason = run_recipe(
                loaded, output=self.run_dir, resume=self.resume, observer=self.dispatcher
            )
        finally:
            registration.release()
            self.finished.set()
        if self.dispatcher.error is not None:
            raise CallbackError(
                f"a callback raised {type(self.dispatcher.error).__name__}: "
                f"{self.dispatcher.error} (the run stopped: {reason}; {self.run_dir})"
            ) from self.dispatcher.error
        return RunResult.read(self.run_dir, reason)


def _loop_running() -> bool:
    """An asyncio loop runs in this thread (a notebook cell, an async app)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _wait(future: Future[RunResult], session: _Session) -> RunResult:
    """The result; a first interrupt stops the run gracefully and keeps waiting."""
    try:
        return future.result()
    except KeyboardInterrupt:
        session.control.stop("interrupted")
        return future.result()
