"""The agent loop: single and multi-turn episodes, token-exact history, limits, hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerFast

from nexrl_async.config.rollout import SamplingConfig
from nexrl_async.core.records import (
    DataItem,
    Group,
    Status,
    Turn,
    VersionSpan,
    VersionToken,
)
from nexrl_async.rollout.tools import Message, Tool
from nexrl_async.rollout.worker import RolloutWorker

CALL_ADD = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}</tool_call>'
added: list[tuple[int, int]] = []


async def add(a: int, b: int) -> int:
    """Add two integers."""
    added.append((a, b))
    return a + b


async def test_single_turn_group(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken, events: Any
) -> None:
    gen = scripted(lambda call: says(f"answer {call.sticky_key}", version=1))
    group = await worker(gen, group_size=3).run_group(item(), token, group_id="g3")
    assert isinstance(group, Group)
    assert (group.group_id, group.item_key, group.token) == ("g3", "0:7", token)
    assert sorted(c.sticky_key for c in gen.calls) == ["g3:0", "g3:1", "g3:2"]
    for i, traj in enumerate(group.trajectories):
        assert traj.status is Status.OK
        assert (traj.sample_index, traj.token, traj.group_id) == (i, token, "g3")
        prompt, answer = traj.turns
        assert (prompt.role, answer.role) == ("user", "assistant")
        assert prompt.loss_mask == [0] * len(prompt.token_ids)
        assert answer.loss_mask == [1] * len(answer.token_ids)
        assert answer.logprobs == [-0.5] * len(answer.token_ids)
        assert answer.versions == [VersionSpan(start=0, end=len(answer.token_ids), version=1)]
        assert answer.text == f"answer g3:{i}"
        assert answer.finish_reason == "stop"
        assert traj.reward == len(f"answer g3:{i}")
        assert traj.metrics == {"turns": 2.0}
        assert set(traj.timings) >= {"generate_s", "evaluate_s", "total_s"}
    assert len(events.turns) == 3
    assert {e["weight_version"] for e in events.turns} == {1}
    assert sorted(e["sample_index"] for e in events.scores) == [0, 1, 2]
    assert all(e["status"] is Status.OK for e in events.scores)


async def test_prompt_is_rendered_once_with_system_prompt(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken, tok: Any
) -> None:
    gen = scripted(lambda call: says("2"))
    w = worker(
        gen, group_size=1, system_prompt="Be brief.", sampling=SamplingConfig(temperature=0.0)
    )
    (traj,) = (await w.run_group(item("1+1?"), token, group_id="g")).trajectories
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
    assert tok.decode(traj.turns[0].token_ids) == expected + "<|im_start|>assistant\n"
    assert gen.calls[0].input_ids == traj.turns[0].token_ids
    assert gen.calls[0].sampling.temperature == 0.0
    assert gen.calls[0].max_new_tokens == 256


async def test_messages_prompt_field(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken, tok: Any
) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    w = worker(scripted(lambda call: says("A")), group_size=1, system_prompt="ignored")
    (traj,) = (await w.run_group(item(messages), token, group_id="g")).trajectories
    assert tok.decode(traj.turns[0].token_ids).startswith("<|im_start|>system\nS<|im_end|>")


def conversation_reply(says: Any) -> Callable[[Any], Any]:
    """First turn calls the tool, the second answers."""

    def reply(call: Any) -> Any:
        return says(CALL_ADD if call.index == 0 else "It is 2.")

    return reply


async def test_tool_call_episode_is_token_exact(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken, tok: Any
) -> None:
    added.clear()
    gen = scripted(conversation_reply(says))
    w = worker(gen, group_size=1, max_turns=4, tools=[Tool(add)], system_prompt="Use tools.")
    (traj,) = (await w.run_group(item("1+1?"), token, group_id="g")).trajectories
    assert traj.status is Status.OK, traj.failure_detail
    assert added == [(1, 1)]
    roles = [t.role for t in traj.turns]
    assert roles == ["user", "assistant", "tool", "assistant"]
    prompt, first, tool_turn, second = traj.turns
    # every generate call saw exactly the concatenation of the turns before it
    assert gen.calls[0].input_ids == prompt.token_ids
    assert gen.calls[1].input_ids == prompt.token_ids + first.token_ids + tool_turn.token_ids
    assert first.token_ids == says(CALL_ADD).output_ids
    assert second.token_ids == says("It is 2.").output_ids
    assert traj.token_ids == [i for t in traj.turns for i in t.token_ids]
    assert traj.loss_mask == (
        [0] * len(prompt.token_ids)
        + [1] * len(first.token_ids)
        + [0] * len(tool_turn.token_ids)
        + [1] * len(second.token_ids)
    )
    assert (tool_turn.tool_name, tool_turn.text, tool_turn.logprobs) == ("add", "2", None)
    # the whole context equals rendering the whole conversation with the template
    conversation = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": CALL_ADD},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "It is 2."},
    ]
    rendered = tok.apply_chat_template(conversation, tools=[Tool(add).schema], tokenize=False)
    assert tok.decode(traj.token_ids) + "\n" == rendered
    assert traj.response_text == "It is 2."


async def test_tool_calls_are_ignored_without_tools(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken
) -> None:
    gen = scripted(conversation_reply(says))
    (traj,) = (
        await worker(gen, group_size=1, max_turns=4).run_group(item(), token, group_id="g")
    ).trajectories
    assert [t.role for t in traj.turns] == ["user", "assistant"]
    assert len(gen.calls) == 1


async def test_max_turns_stops_without_running_the_last_call(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken, events: Any
) -> None:
    added.clear()
    gen = scripted(lambda call: says(CALL_ADD))
    w = worker(gen, group_size=1, max_turns=2, tools=[Tool(add)])
    (traj,) = (await w.run_group(item(), token, group_id="g")).trajectories
    assert traj.status is Status.OK
    assert [t.role for t in traj.turns] == ["user", "assistant", "tool", "assistant"]
    assert len(gen.calls) == 2
    assert added == [(1, 1)]
    assert [e["turn_index"] for e in events.turns] == [0, 1]


async def test_truncated_turn_ends_the_episode(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken
) -> None:
    gen = scripted(lambda call: says(CALL_ADD, end=False, finish="length"))
    w = worker(gen, group_size=1, max_turns=3, tools=[Tool(add)])
    (traj,) = (await w.run_group(item(), token, group_id="g")).trajectories
    assert [t.role for t in traj.turns] == ["user", "assistant"]
    assert traj.turns[1].finish_reason == "length"


async def test_token_budget_caps_max_new_tokens_and_stops(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken
) -> None:
    gen = scripted(lambda call: says("x" * (call.max_new_tokens - 1)))
    w = worker(gen, group_size=1, max_turns=5, max_new_tokens=50, tools=[Tool(add)])
    prompt_len = len(w.render([{"role": "user", "content": "1+1?"}]))
    w = worker(
        gen,
        group_size=1,
        max_turns=5,
        max_new_tokens=50,
        tools=[Tool(add)],
        context_length=prompt_len + 20,
    )
    (traj,) = (await w.run_group(item(), token, group_id="g")).trajectories
    assert gen.calls[0].max_new_tokens == 20
    assert traj.num_tokens == prompt_len + 20


async def test_interrupted_turn_resumes_with_version_spans(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken, events: Any
) -> None:
    whole = says("twenty two", version=2)

    def reply(call: Any) -> Any:
        if call.index == 0:  # aborted by a publication after 4 tokens under version 1
            part = whole.output_ids[:4]
            return type(whole)(
                output_ids=part, logprobs=[-1.0] * 4, finish_reason="abort", weight_version=1
            )
        rest = whole.output_ids[4:]
        return type(whole)(
            output_ids=rest, logprobs=[-2.0] * len(rest), finish_reason="stop", weight_version=2
        )

    gen = scripted(reply)
    (traj,) = (await worker(gen, group_size=1).run_group(item(), token, group_id="g")).trajectories
    answer = traj.turns[1]
    assert answer.token_ids == whole.output_ids
    assert gen.calls[1].input_ids == gen.calls[0].input_ids + whole.output_ids[:4]
    assert gen.calls[1].max_new_tokens == 256 - 4
    n = len(whole.output_ids)
    assert answer.versions == [
        VersionSpan(start=0, end=4, version=1),
        VersionSpan(start=4, end=n, version=2),
    ]
    assert answer.logprobs == [-1.0] * 4 + [-2.0] * (n - 4)
    assert answer.text == "twenty two"
    assert traj.head_version == 1
    assert events.turns[0]["weight_version"] == 1
    assert events.turns[0]["n_tokens"] == n


class FeedbackWorker(RolloutWorker):
    """Tells the model it is wrong once, then stops; trains on the last turn only."""

    async def on_turn(self, item: DataItem, messages: list[Message], turn: Turn) -> Any:
        if len(messages) < 4:
            return [{"role": "user", "content": "Wrong, try again."}]
        return []

    def loss_mask(self, turns: list[Turn]) -> list[Turn]:
        last = max(i for i, t in enumerate(turns) if t.role == "assistant")
        return [
            Turn(
                role=t.role,
                token_ids=t.token_ids,
                loss_mask=[int(i == last)] * len(t.token_ids),
                logprobs=t.logprobs,
                versions=t.versions,
                text=t.text,
            )
            for i, t in enumerate(turns)
        ]


async def test_on_turn_feedback_and_loss_mask_hooks(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken, tok: Any
) -> None:
    gen = scripted(lambda call: says(f"try {call.index}"))
    w = worker(gen, cls=FeedbackWorker, group_size=1, max_turns=5)
    (traj,) = (await w.run_group(item(), token, group_id="g")).trajectories
    assert [t.role for t in traj.turns] == ["user", "assistant", "user", "assistant"]
    assert tok.decode(traj.turns[2].token_ids).startswith("\n<|im_start|>user\nWrong")
    assert [sum(t.loss_mask) for t in traj.turns] == [0, 0, 0, len(traj.turns[3].token_ids)]
    assert traj.response_text == "try 1"


class StringQueryWorker(RolloutWorker):
    def format_query(self, item: DataItem) -> str:
        return f"Q: {item.fields['question']}"


async def test_format_query_hook_may_return_a_string(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken, tok: Any
) -> None:
    gen = scripted(lambda call: says("A"))
    w = worker(gen, cls=StringQueryWorker, group_size=1, system_prompt="S")
    (traj,) = (await w.run_group(item(None, question="why"), token, group_id="g")).trajectories
    assert tok.decode(traj.turns[0].token_ids).startswith(
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ: why<|im_end|>"
    )


async def test_tool_that_raises_becomes_a_tool_message(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken
) -> None:
    async def explode(a: int, b: int) -> int:
        raise ZeroDivisionError("no")

    gen = scripted(conversation_reply(says))
    w = worker(gen, group_size=1, max_turns=3, tools=[Tool(explode, name="add")])
    (traj,) = (await w.run_group(item(), token, group_id="g")).trajectories
    assert traj.status is Status.OK
    assert traj.turns[2].text == "error: ZeroDivisionError: no"
    assert len(gen.calls) == 2


async def test_without_chat_template(
    worker: Any, scripted: Any, says: Any, item: Any, token: VersionToken, tok: Any
) -> None:
    gen = scripted(lambda call: says("2"))
    w = worker(gen, group_size=1, apply_chat_template=False, system_prompt="S")
    (traj,) = (await w.run_group(item("1+1?"), token, group_id="g")).trajectories
    assert tok.decode(traj.turns[0].token_ids) == "S\n1+1?"


def test_default_loss_mask_keeps_model_tokens(
    worker: Any, scripted: Any, tok: PreTrainedTokenizerFast
) -> None:
    w = worker(scripted(lambda call: None))
    turns = [
        Turn(role="user", token_ids=[1, 2], loss_mask=[1, 1]),
        Turn(role="assistant", token_ids=[3], loss_mask=[0]),
        Turn(role="tool", token_ids=[4], loss_mask=[0], tool_name="t"),
    ]
    assert [t.loss_mask for t in w.loss_mask(turns)] == [[0, 0], [1], [0]]
    assert w.loss_mask(turns)[2].tool_name == "t"
