"""Callbacks: what a script sees of a run while it trains, and how it stops one.

A callback is any object with some of these methods (each optional), or a plain function
``fn(event, run)`` that gets every event::

    on_step_end(event: StepEnd, run: RunControl)        after each train step (its metrics)
    on_validation(event: Validation, run: RunControl)   after each validation
    on_checkpoint(event: Checkpoint, run: RunControl)   after each checkpoint is written

They run on the run's event loop (keep them quick: rollouts wait while one runs), in the order
given. ``run.stop("reason")`` asks for a graceful stop: the running step finishes, a checkpoint
is written, and the run ends with reason ``"stopped (reason)"``. A callback that raises stops
the run the same way (``"stopped (callback error)"``) and ``train`` raises
:class:`CallbackError` with the original exception as its cause.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus
from loguru import logger

from nexrl_async.engine.context import RunContext
from nexrl_async.obs.ledger import Checkpointed, Event, Validated

POLL_S = 0.1
"""How often the run looks for a stop requested from another thread."""
STEP_END_KEY = "timing/step_s"
"""Every step's metrics carry it; the final validation's row (logged alone) does not."""


@dataclass(frozen=True)
class StepEnd:
    """Train step ``step`` (0-based, as in ``metrics.jsonl``) ended with these metrics."""

    step: int
    metrics: Mapping[str, float]

    @property
    def steps_done(self) -> int:
        return self.step + 1


@dataclass(frozen=True)
class Validation:
    """Validation after ``step`` steps (0: the initial weights); ``val/...`` metrics."""

    step: int
    metrics: Mapping[str, float | None]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of the state after ``step`` steps was written to ``path``."""

    step: int
    path: Path


RunEvent = StepEnd | Validation | Checkpoint
_METHODS = {StepEnd: "on_step_end", Validation: "on_validation", Checkpoint: "on_checkpoint"}


class RunControl:
    """What a callback (or another thread) can do to its run."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.stop_reason: str | None = None
        self._stop: Callable[[str], None] | None = None
        self._thread: int | None = None
        self._delivered = False
        self._lock = threading.Lock()

    def stop(self, reason: str = "callback") -> None:
        """Stop the run gracefully (finish the step, checkpoint, end). Safe from any thread:
        on the run's loop (a callback) it acts at once, from elsewhere within
        :data:`POLL_S`; before the run's loop starts the request waits for it. Later requests
        are ignored."""
        with self._lock:
            if self.stop_reason is not None:
                return
            self.stop_reason = f"stopped ({reason})"
            here = self._stop is not None and threading.get_ident() == self._thread
        if here:
            self.deliver()

    def bind(self, stop: Callable[[str], None]) -> None:
        """Called on the run's event loop once it runs."""
        with self._lock:
            self._stop, self._thread = stop, threading.get_ident()

    def deliver(self) -> None:
        """On the run's loop: pass a pending stop request to the run (once)."""
        with self._lock:
            if self.stop_reason is None or self._stop is None or self._delivered:
                return
            self._delivered = True
            stop, reason = self._stop, self.stop_reason
        stop(reason)

    def unbind(self) -> None:
        with self._lock:
            self._stop = None


class Dispatcher:
    """The engine's :class:`~nexrl_async.engine.run.RunObserver`: turns the run's metrics and
    ledger into callback calls."""

    def __init__(self, callbacks: Sequence[Any], control: RunControl) -> None:
        for callback in callbacks:
            if not callable(callback) and not any(hasattr(callback, m) for m in _METHODS.values()):
                raise TypeError(
                    f"callback {callback!r} has none of {', '.join(_METHODS.values())} and is "
                    "not callable"
                )
        self.callbacks = list(callbacks)
        self.control = control
        self.error: BaseException | None = None

    async def run_watch(
        self,
        ctx: RunContext,
        stop: Callable[[str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """A task of the run's root group: hooks into its metrics and ledger, then passes stop
        requests made from other threads to the run (every :data:`POLL_S`)."""
        self.control.bind(stop)
        ctx.metrics.sinks.append(_StepSink(self))
        ctx.ledger.subscribe(self.on_event)
        task_status.started()
        try:
            while True:
                self.control.deliver()
                await anyio.sleep(POLL_S)
        finally:
            self.control.unbind()

    def on_event(self, event: Event) -> None:
        if isinstance(event, Validated):
            self.dispatch(Validation(step=event.step, metrics=dict(event.metrics)))
        elif isinstance(event, Checkpointed):
            self.dispatch(Checkpoint(step=event.step, path=Path(event.path)))

    def dispatch(self, event: RunEvent) -> None:
        if self.error is not None:
            return
        method = _METHODS[type(event)]
        for callback in self.callbacks:
            fn = getattr(callback, method, None)
            if fn is None and not any(hasattr(callback, m) for m in _METHODS.values()):
                fn = callback
            if fn is None:
                continue
            try:
                fn(event, self.control)
            except Exception as err:  # noqa: BLE001 - reported by train(), after a clean stop
                logger.opt(exception=err).error("callback {!r} raised; stopping the run", fn)
                self.error = err
                self.control.stop("callback error")
                return


class _StepSink:
    """A metrics sink that reports step ends to the dispatcher."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if STEP_END_KEY in metrics:
            self.dispatcher.dispatch(StepEnd(step=step, metrics=dict(metrics)))

    def close(self) -> None:
        pass
