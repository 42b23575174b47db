"""The group's shared opening: one render and one group request for the first turn, then each
sample on its own (resumes, later turns, failures that touch only their sample)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio

from nexrl_async.config.rollout import SamplingConfig
from nexrl_async.core.errors import EngineUnavailable
from nexrl_async.core.records import FailureReason, Status, VersionSpan, VersionToken
from nexrl_async.rollout.generation import GeneratedTurn
from nexrl_async.rollout.tools import Message
from nexrl_async.rollout.worker import RolloutWorker

R = FailureReason


class CountingRender(RolloutWorker):
    renders = 0

    def render(self, messages: list[Message]) -> list[int]:
        CountingRender.renders += 1
        return super().render(messages)


async def test_first_turn_is_one_group_call_and_later_turns_go_per_sample(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken
) -> None:
    def reply(call: Any) -> Any:
        return says(f"turn {call.index} of {call.sticky_key}")

    class Twice(CountingRender):
        async def on_turn(self, item: Any, messages: list[Message], turn: Any) -> Any:
            return [{"role": "user", "content": "again"}] if len(messages) < 4 else []

    CountingRender.renders = 0
    gen = scripted(reply)
    group = await worker(gen, cls=Twice, group_size=3, max_turns=2).run_group(
        item(), token, group_id="g"
    )
    assert gen.groups == [["g:0", "g:1", "g:2"]]
    assert CountingRender.renders == 1, "the shared prompt is rendered once per group"
    prompts = {tuple(c.input_ids) for c in gen.calls if c.index == 0}
    assert len(prompts) == 1
    for traj in group.trajectories:
        assert traj.status is Status.OK, traj.failure_detail
        key = f"g:{traj.sample_index}"
        first, second = (t for t in traj.turns if t.role == "assistant")
        assert (first.text, second.text) == (f"turn 0 of {key}", f"turn 1 of {key}")
        later = gen.for_sample(key)[1]
        assert later.input_ids == [i for t in traj.turns[:-1] for i in t.token_ids]


async def test_an_aborted_group_answer_resumes_that_sample_alone(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken
) -> None:
    whole = says("seventeen", version=2)

    def reply(call: Any) -> Any:
        if call.sticky_key == "g:1" and call.index == 0:
            part = whole.output_ids[:3]
            return GeneratedTurn(
                output_ids=part, logprobs=[-1.0] * 3, finish_reason="abort", weight_version=1
            )
        if call.sticky_key == "g:1":
            rest = whole.output_ids[3:]
            return GeneratedTurn(
                output_ids=rest, logprobs=[-2.0] * len(rest), finish_reason="stop",
                weight_version=2,
            )  # fmt: skip
        return whole

    gen = scripted(reply)
    group = await worker(gen, group_size=3).run_group(item(), token, group_id="g")
    assert [len(gen.for_sample(f"g:{i}")) for i in range(3)] == [1, 2, 1]
    resume = gen.for_sample("g:1")[1]
    assert resume.input_ids == gen.calls[0].input_ids + whole.output_ids[:3]
    assert resume.max_new_tokens == 256 - 3
    resumed = group.trajectories[1].turns[1]
    assert resumed.token_ids == whole.output_ids
    n = len(whole.output_ids)
    assert resumed.versions == [VersionSpan(start=0, end=3, version=1),
                                VersionSpan(start=3, end=n, version=2)]  # fmt: skip
    assert group.trajectories[1].head_version == 1
    assert group.trajectories[0].turns[1].versions == [VersionSpan(start=0, end=n, version=2)]


class FailingGroups:
    """A generator whose group request fails as a whole."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.singles = 0

    async def generate(self, input_ids: list[int], **kw: Any) -> GeneratedTurn:
        self.singles += 1
        raise AssertionError("no per-sample call expected")

    async def generate_group(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        sticky_keys: Sequence[str],
    ) -> list[GeneratedTurn | Exception]:
        raise self.error


async def test_a_failed_group_request_fails_every_sample_alike(
    worker: Any, item: Any, token: VersionToken, failed: Any, events: Any
) -> None:
    gen = FailingGroups(EngineUnavailable("fleet down"))
    group = await worker(gen, group_size=3).run_group(item(), token, group_id="g")
    for traj in group.trajectories:
        failed(traj, R.ENGINE_UNAVAILABLE)
        assert [t.role for t in traj.turns] == ["user"]
    assert [e["failure"] for e in events.scores] == [R.ENGINE_UNAVAILABLE] * 3
    assert gen.singles == 0


async def test_a_group_answer_that_is_an_error_fails_only_its_sample(
    worker: Any, says: Any, item: Any, token: VersionToken, failed: Any
) -> None:
    class OneBad(FailingGroups):
        async def generate_group(self, input_ids: list[int], **kw: Any) -> Any:
            return [says("ok"), EngineUnavailable("lost"), says("ok")]

    group = await worker(OneBad(RuntimeError()), group_size=3).run_group(
        item(), token, group_id="g"
    )
    assert [t.status for t in group.trajectories] == [Status.OK, Status.FAILED, Status.OK]
    failed(group.trajectories[1], R.ENGINE_UNAVAILABLE)


async def test_a_wrong_number_of_group_answers_fails_the_group(
    worker: Any, says: Any, item: Any, token: VersionToken, failed: Any
) -> None:
    class Short(FailingGroups):
        async def generate_group(self, input_ids: list[int], **kw: Any) -> Any:
            return [says("only one")]

    group = await worker(Short(RuntimeError()), group_size=2).run_group(item(), token, group_id="g")
    for traj in group.trajectories:
        failed(traj, R.GENERATION_ERROR)


async def test_a_slow_group_request_times_every_sample_out(
    worker: Any, item: Any, token: VersionToken, failed: Any
) -> None:
    class Slow(FailingGroups):
        async def generate_group(self, input_ids: list[int], **kw: Any) -> Any:
            await anyio.sleep(30)

    with anyio.fail_after(5):
        group = await worker(Slow(RuntimeError()), sample_timeout_s=0.05).run_group(
            item(), token, group_id="g"
        )
    for traj in group.trajectories:
        failed(traj, R.TIMEOUT)
        assert "generate" in traj.failure_detail
