"""The per-sample fault boundary: every failure reason, timeouts, and cancellation."""

from __future__ import annotations

import math
import threading
from typing import Any

import anyio
import pytest

from nexrl_async.core.errors import EngineUnavailable, GenerationError, RequestRejected
from nexrl_async.core.records import (
    DataItem,
    EvalResult,
    FailureReason,
    Status,
    Trajectory,
    Turn,
    VersionToken,
)
from nexrl_async.rollout.faults import SampleFailed
from nexrl_async.rollout.tools import Message, Tool
from nexrl_async.rollout.worker import RolloutWorker

R = FailureReason


async def one(worker: RolloutWorker, item: DataItem, token: VersionToken) -> Trajectory:
    group = await worker.run_group(item, token, group_id="g")
    assert len(group.trajectories) == worker.cfg.group_size
    return group.trajectories[0]


async def test_missing_required_fields_is_bad_item(
    worker: Any, scripted: Any, says: Any, item: Any, token: Any, failed: Any, events: Any
) -> None:
    gen = scripted(lambda call: says("x"))
    group = await worker(gen, required=["prompt", "answer"]).run_group(item(), token, group_id="g")
    for traj in group.trajectories:
        failed(traj, R.BAD_ITEM)
        assert "answer" in traj.failure_detail
        assert traj.reward == 0.0
    assert gen.calls == []
    assert [e["failure"] for e in events.scores] == [R.BAD_ITEM, R.BAD_ITEM]


@pytest.mark.parametrize("prompt", [None, 42, [{"content": "no role"}]])
async def test_unusable_prompt_field_is_bad_item(
    worker: Any, scripted: Any, item: Any, token: Any, failed: Any, prompt: Any
) -> None:
    failed(await one(worker(scripted(lambda call: None)), item(prompt), token), R.BAD_ITEM)


class RaisingFormat(RolloutWorker):
    def format_query(self, item: DataItem) -> str:
        raise KeyError("question")


class WrongTypeFormat(RolloutWorker):
    def format_query(self, item: DataItem) -> Any:
        return 42


async def test_format_query_errors(
    worker: Any, scripted: Any, item: Any, token: Any, failed: Any
) -> None:
    gen = scripted(lambda call: None)
    failed(await one(worker(gen, cls=RaisingFormat), item(), token), R.FORMAT_ERROR)
    failed(await one(worker(gen, cls=WrongTypeFormat), item(), token), R.FORMAT_ERROR)


async def test_chat_template_error_is_format_error(
    worker: Any, scripted: Any, item: Any, token: Any, failed: Any
) -> None:
    class BadTemplate(RolloutWorker):
        def render(self, messages: list[Message]) -> list[int]:
            raise ValueError("template exploded")

    traj = await one(worker(scripted(lambda call: None), cls=BadTemplate), item(), token)
    failed(traj, R.FORMAT_ERROR)
    assert "template exploded" in traj.failure_detail


async def test_render_hook_returning_no_token_ids_is_format_error(
    worker: Any, scripted: Any, item: Any, token: Any, failed: Any
) -> None:
    class TextRender(RolloutWorker):
        def render(self, messages: list[Message]) -> Any:
            return "not ids"

    traj = await one(worker(scripted(lambda call: None), cls=TextRender), item(), token)
    failed(traj, R.FORMAT_ERROR)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RequestRejected(400, "too long"), R.PROMPT_REJECTED),
        (EngineUnavailable("no server"), R.ENGINE_UNAVAILABLE),
        (GenerationError("stream cut"), R.GENERATION_ERROR),
        (RuntimeError("bug in adapter"), R.INTERNAL),
    ],
)
async def test_generation_errors(
    worker: Any, scripted: Any, item: Any, token: Any, failed: Any, error: Any, reason: Any
) -> None:
    traj = await one(worker(scripted(lambda call: error)), item(), token)
    failed(traj, reason)
    assert [t.role for t in traj.turns] == ["user"]  # partial episode kept for inspection


async def test_endless_aborts_are_generation_error(
    worker: Any, scripted: Any, says: Any, item: Any, token: Any, failed: Any
) -> None:
    gen = scripted(lambda call: says("a", end=False, finish="abort"))
    traj = await one(worker(gen, max_resumes=2), item(), token)
    failed(traj, R.GENERATION_ERROR)
    assert len(gen.calls) == 2 * 3  # two samples, three attempts each


async def test_prompt_longer_than_the_budget_is_rejected(
    worker: Any, scripted: Any, item: Any, token: Any, failed: Any
) -> None:
    gen = scripted(lambda call: None)
    traj = await one(worker(gen, max_total_tokens=5), item(), token)
    failed(traj, R.PROMPT_REJECTED)
    assert gen.calls == []


async def test_evaluator_errors_and_invalid_rewards(
    worker: Any, scripted: Any, says: Any, item: Any, token: Any, failed: Any
) -> None:
    gen = scripted(lambda call: says("x"))

    def raising(item: DataItem, trajectory: Trajectory) -> float:
        raise ZeroDivisionError("bad scorer")

    async def nan(item: DataItem, trajectory: Trajectory) -> EvalResult:
        return EvalResult(reward=math.nan)

    def text(item: DataItem, trajectory: Trajectory) -> str:
        return "1.0"

    failed(await one(worker(gen, evaluate=raising), item(), token), R.EVALUATOR_ERROR)
    failed(await one(worker(gen, evaluate=nan), item(), token), R.INVALID_REWARD)
    traj = await one(worker(gen, evaluate=text), item(), token)
    failed(traj, R.INVALID_REWARD)
    assert [t.role for t in traj.turns] == ["user", "assistant"]


async def test_tool_result_that_cannot_become_text_is_tool_error(
    worker: Any, scripted: Any, says: Any, item: Any, token: Any, failed: Any
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    async def weird() -> Any:
        return Unprintable()

    call = '<tool_call>{"name": "weird", "arguments": {}}</tool_call>'
    gen = scripted(lambda c: says(call))
    traj = await one(worker(gen, max_turns=2, tools=[Tool(weird)]), item(), token)
    failed(traj, R.TOOL_ERROR)


class BadMask(RolloutWorker):
    def loss_mask(self, turns: list[Turn]) -> list[Turn]:
        return turns[1:]


async def test_broken_hooks_are_internal(
    worker: Any, scripted: Any, says: Any, item: Any, token: Any, failed: Any
) -> None:
    class BadOnTurn(RolloutWorker):
        def on_turn(self, item: DataItem, messages: list[Message], turn: Turn) -> Any:
            raise AttributeError("oops")

    gen = scripted(lambda call: says("x"))
    failed(await one(worker(gen, cls=BadMask), item(), token), R.INTERNAL)
    failed(await one(worker(gen, cls=BadOnTurn), item(), token), R.INTERNAL)


async def test_custom_workers_may_fail_a_sample_with_a_reason(
    worker: Any, scripted: Any, says: Any, item: Any, token: Any, failed: Any
) -> None:
    class Picky(RolloutWorker):
        def on_turn(self, item: DataItem, messages: list[Message], turn: Turn) -> Any:
            raise SampleFailed(R.BAD_ITEM, "answer key unusable")

    traj = await one(worker(scripted(lambda call: says("x")), cls=Picky), item(), token)
    failed(traj, R.BAD_ITEM)
    assert traj.failure_detail == "answer key unusable"


async def test_one_failed_sample_leaves_the_others_alone(
    worker: Any, scripted: Any, says: Any, item: Any, token: Any, failed: Any
) -> None:
    def reply(call: Any) -> Any:
        return GenerationError("cut") if call.sticky_key == "g:1" else says("fine")

    group = await worker(scripted(reply), group_size=3).run_group(item(), token, group_id="g")
    statuses = [t.status for t in group.trajectories]
    assert statuses == [Status.OK, Status.FAILED, Status.OK]
    failed(group.trajectories[1], R.GENERATION_ERROR)
    assert not group.ok


async def test_slow_generation_times_out(
    worker: Any, scripted: Any, item: Any, token: Any, failed: Any
) -> None:
    async def never(call: Any) -> Any:
        await anyio.sleep(30)

    with anyio.fail_after(5):
        traj = await one(worker(scripted(never), sample_timeout_s=0.05), item(), token)
    failed(traj, R.TIMEOUT)
    assert "generate" in traj.failure_detail


async def test_stuck_sync_evaluator_times_out_without_waiting_for_its_thread(
    worker: Any, scripted: Any, says: Any, item: Any, token: Any, failed: Any
) -> None:
    release = threading.Event()

    def stuck(item: DataItem, trajectory: Trajectory) -> float:
        release.wait(10)
        return 1.0

    try:
        with anyio.fail_after(5):
            traj = await one(
                worker(scripted(lambda c: says("x")), evaluate=stuck, sample_timeout_s=0.1),
                item(),
                token,
            )
    finally:
        release.set()  # let the abandoned scorer threads finish
    failed(traj, R.TIMEOUT)
    assert "evaluate" in traj.failure_detail


async def test_cancelling_run_group_propagates_and_stops_every_sample(
    worker: Any, scripted: Any, item: Any, token: Any, events: Any
) -> None:
    started: list[str] = []
    stopped: list[str] = []
    all_started = anyio.Event()

    async def hang(call: Any) -> Any:
        started.append(call.sticky_key)
        if len(started) == 3:
            all_started.set()
        try:
            await anyio.sleep(30)
        finally:
            stopped.append(call.sticky_key)

    w = worker(scripted(hang), group_size=3)
    results: list[Any] = []

    async def run() -> None:
        results.append(await w.run_group(item(), token, group_id="g"))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await all_started.wait()
            tg.cancel_scope.cancel()
    assert results == []  # cancellation was not turned into a (failed) group
    assert sorted(stopped) == ["g:0", "g:1", "g:2"]
    assert events.scores == []


async def test_cancellation_is_not_a_timeout(
    worker: Any, scripted: Any, item: Any, token: Any, events: Any
) -> None:
    async def hang(call: Any) -> Any:
        await anyio.sleep(30)

    w = worker(scripted(hang), sample_timeout_s=10.0)
    with anyio.move_on_after(0.05) as outer:
        await w.run_group(item(), token, group_id="g")
        pytest.fail("run_group returned under cancellation")
    assert outer.cancelled_caught
    assert events.scores == []  # no sample was reported failed (timeout or otherwise)
