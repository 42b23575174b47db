"""Callbacks, their control handle and the result read back from a run folder."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from nexrl_async.api.callbacks import (
    STEP_END_KEY,
    Checkpoint,
    Dispatcher,
    RunControl,
    StepEnd,
    Validation,
)
from nexrl_async.api.entry import RunResult
from nexrl_async.obs.ledger import Checkpointed, Pooled, RunLedger, Validated
from nexrl_async.obs.metrics import JsonlMetrics, MetricsHub


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_step_end(self, event: StepEnd, run: RunControl) -> None:
        self.seen.append(event)

    def on_checkpoint(self, event: Checkpoint, run: RunControl) -> None:
        self.seen.append(event)


def bound(callbacks: list[Any], stops: list[str]) -> Dispatcher:
    dispatcher = Dispatcher(callbacks, RunControl(Path("run")))
    dispatcher.control.bind(stops.append)  # called on "the loop": this thread
    return dispatcher


def run_context(tmp_path: Path) -> Any:
    """The two parts of a RunContext the dispatcher hooks into."""
    return SimpleNamespace(metrics=MetricsHub([]), ledger=RunLedger(tmp_path / "e.jsonl"))


async def test_events_reach_the_methods_a_callback_has(tmp_path: Path) -> None:
    recorder, everything, stops = Recorder(), [], []
    dispatcher = Dispatcher(
        [recorder, lambda event, run: everything.append(event)], RunControl(tmp_path)
    )
    ctx = run_context(tmp_path)
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run_watch, ctx, stops.append)
        ctx.metrics.log(0, {"rollout/reward_mean": 0.5, STEP_END_KEY: 1.0})
        ctx.metrics.log(1, {"val/reward_mean": 0.9})  # the final validation's row: no step end
        ctx.ledger.emit(Validated(step=1, metrics={"val/reward_mean": 0.9}))
        ctx.ledger.emit(Checkpointed(step=1, path="/tmp/ckpt"))
        ctx.ledger.emit(Pooled(group_id="g", head_version=0))  # not a callback event
        tg.cancel_scope.cancel()
    ctx.ledger.close()
    assert recorder.seen == [
        StepEnd(step=0, metrics={"rollout/reward_mean": 0.5, STEP_END_KEY: 1.0}),
        Checkpoint(step=1, path=Path("/tmp/ckpt")),
    ]
    assert [type(e) for e in everything] == [StepEnd, Validation, Checkpoint]
    assert recorder.seen[0].steps_done == 1
    assert stops == []


def test_a_callback_that_raises_stops_the_run_once() -> None:
    calls, stops = [], []

    def boom(event: Any, run: RunControl) -> None:
        calls.append(event)
        raise ValueError("bad callback")

    dispatcher = bound([boom], stops)
    dispatcher.dispatch(StepEnd(step=0, metrics={}))
    dispatcher.dispatch(StepEnd(step=1, metrics={}))
    assert isinstance(dispatcher.error, ValueError)
    assert len(calls) == 1  # later events are not dispatched
    assert stops == ["stopped (callback error)"]


def test_stop_asks_once_and_a_request_before_the_loop_waits_for_it() -> None:
    control = RunControl(Path("run"))
    control.stop("plateau")
    control.stop("again")
    stops: list[str] = []
    control.bind(stops.append)
    control.deliver()  # what the run's watch task does on its loop
    control.deliver()
    assert stops == ["stopped (plateau)"]
    assert control.stop_reason == "stopped (plateau)"


async def test_stop_from_another_thread_reaches_the_run_on_its_loop(tmp_path: Path) -> None:
    control = RunControl(tmp_path)
    dispatcher = Dispatcher([], control)
    seen: list[tuple[str, bool]] = []
    loop_thread = threading.get_ident()
    delivered = anyio.Event()

    def stop(reason: str) -> None:
        seen.append((reason, threading.get_ident() == loop_thread))
        delivered.set()

    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run_watch, run_context(tmp_path), stop)
        await anyio.to_thread.run_sync(control.stop, "from a thread")
        with anyio.fail_after(5):
            await delivered.wait()
        tg.cancel_scope.cancel()
    assert seen == [("stopped (from a thread)", True)]


def test_an_object_that_is_no_callback_is_refused() -> None:
    with pytest.raises(TypeError, match="on_step_end"):
        Dispatcher([object()], RunControl(Path("run")))


def test_run_result_reads_the_last_value_of_every_metric(tmp_path: Path) -> None:
    sink = JsonlMetrics(tmp_path / "metrics.jsonl")
    sink.log(0, {"rollout/reward_mean": 0.1, "val/reward_mean": 0.0})
    sink.log(1, {"rollout/reward_mean": 0.4, "train/loss": float("nan")})
    sink.log(2, {"val/reward_mean": 0.8})
    sink.close()
    result = RunResult.read(tmp_path, "completed")
    assert result.completed
    assert result.metrics["rollout/reward_mean"] == 0.4
    assert result.metrics["val/reward_mean"] == 0.8
    assert math.isnan(result.metrics["train/loss"])
    assert result.series("val/reward_mean") == [(0, 0.0), (2, 0.8)]
    assert len(result.history) == 3
    assert RunResult.read(tmp_path / "none", "error").metrics == {}


def test_an_interrupt_while_waiting_asks_a_graceful_stop_and_keeps_waiting(tmp_path: Path) -> None:
    from concurrent.futures import Future

    from nexrl_async.api.entry import _Session, _wait

    session = _Session("recipe.toml", tmp_path, None, (), None, None)
    done = RunResult(run_dir=tmp_path, reason="stopped (interrupted)")

    class Interrupted(Future[RunResult]):
        calls = 0

        def result(self, timeout: float | None = None) -> RunResult:
            self.calls += 1
            if self.calls == 1:
                raise KeyboardInterrupt  # Ctrl-C / the notebook's stop button
            return done

    future = Interrupted()
    assert _wait(future, session) is done
    assert future.calls == 2
    assert session.control.stop_reason == "stopped (interrupted)"
