"""Samples that cannot wait finish in the group's own task; all others get a task each.

A sample settles inline when its first turn is whole, ends the episode and is scored by an
inline evaluator with no transcript check; the results are the same either way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nexrl_async.core.records import DataItem, EvalResult, Status, Trajectory, VersionToken
from nexrl_async.rollout.events import NoEvents
from nexrl_async.rollout.tools import Tool
from nexrl_async.rollout.worker import RolloutWorker


class Evaluator:
    """Reward = the answer's length; ``inline`` as given."""

    def __init__(self, *, inline: bool) -> None:
        self.inline = inline

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        return EvalResult(reward=float(len(trajectory.response_text)))


class TaskEvents(NoEvents):
    """Records the asyncio task each sample's turn was generated in."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any] | None] = []

    def turn_generated(self, **kw: Any) -> None:
        self.tasks.append(asyncio.current_task())


async def tasks_of(worker: Any, gen: Any, item: Any, token: VersionToken, **kw: Any) -> set[Any]:
    evaluate = Evaluator(inline=kw.pop("inline", True))
    w = worker(gen, group_size=4, evaluate=evaluate, **kw)
    w.events = events = TaskEvents()
    group = await w.run_group(item(), token, group_id="g")
    assert [t.status for t in group.trajectories] == [Status.OK] * 4
    assert [t.reward for t in group.trajectories] == [len("done")] * 4
    assert len(events.tasks) == 4
    return set(events.tasks)


async def test_whole_single_turns_with_an_inline_evaluator_run_in_the_group_task(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken
) -> None:
    gen = scripted(lambda call: says("done"))
    assert await tasks_of(worker, gen, item, token) == {asyncio.current_task()}


@pytest.mark.parametrize(
    "case",
    ["threaded evaluator", "transcript check", "tools", "on_turn hook", "aborted first turn"],
)
async def test_samples_that_may_wait_get_a_task_each(
    case: str, worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken
) -> None:
    kw: dict[str, Any] = {}
    reply = lambda call: says("done")  # noqa: E731
    if case == "threaded evaluator":
        kw["inline"] = False
    elif case == "transcript check":
        kw["check_transcript"] = True
    elif case == "tools":

        async def noop() -> int:
            """Nothing."""
            return 0

        kw["tools"] = [Tool(noop)]
        kw["max_turns"] = 2
    elif case == "on_turn hook":

        class Hooked(RolloutWorker):
            def on_turn(self, item: Any, messages: Any, turn: Any) -> Any:
                return []

        kw["cls"] = Hooked
    else:
        whole = says("done")

        def reply(call: Any) -> Any:
            if call.index == 0:  # the group request: every sample's first answer aborted early
                return type(whole)(
                    output_ids=whole.output_ids[:1],
                    logprobs=[-1.0],
                    finish_reason="abort",
                    weight_version=0,
                )
            rest = whole.output_ids[1:]
            return type(whole)(
                output_ids=rest, logprobs=[-1.0] * len(rest), finish_reason="stop", weight_version=0
            )

    tasks = await tasks_of(worker, scripted(reply), item, token, **kw)
    assert asyncio.current_task() not in tasks
    assert len(tasks) == 4


async def test_one_turn_settles_inline_even_with_tools(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken
) -> None:
    async def noop() -> int:
        """Nothing."""
        return 0

    gen = scripted(lambda call: says("done"))
    tools = [Tool(noop)]
    assert await tasks_of(worker, gen, item, token, tools=tools, max_turns=1) == {
        asyncio.current_task()
    }
