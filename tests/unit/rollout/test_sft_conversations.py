"""Multi-turn SFT: tool-use demonstrations rendered exactly as the RL agent loop renders them.

The tokenizer is the calculator recipe's (role tokens, ``<eos>`` ending every message, word
tokens for the tool-call tags), so the RL side's scripted model can end its turns as a real one
does. The RL worker plays the same conversation for comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from nexrl_async.config.loader import load_recipe
from nexrl_async.config.model import CharTokenizer
from nexrl_async.config.rollout import RolloutConfig
from nexrl_async.core.records import DataItem, FailureReason, Status, Trajectory, VersionToken
from nexrl_async.rollout.generation import GeneratedTurn
from nexrl_async.rollout.rendering import ChatRenderer
from nexrl_async.rollout.sft_worker import SFTWorker
from nexrl_async.rollout.tools import Message, Tool
from nexrl_async.rollout.worker import RolloutWorker
from nexrl_async.train.build import build_char_tokenizer

RECIPE = Path(__file__).parents[3] / "recipes" / "calculator" / "sft.toml"
TOKEN = VersionToken(lease_id=1, version=2)
CALL = '<tool_call>{"name":"calc","arguments":{"expr":"12*34"}}</tool_call>'
BAD_CALL = '<tool_call>{"name":"calc","arguments":{"expr":"12-34"}}</tool_call>'


async def calc(expr: str) -> str:
    """Multiply ``a*b``."""
    a, sep, b = expr.partition("*")
    if not sep:
        raise ValueError(f"expected a*b, got {expr!r}")
    return str(int(a) * int(b))


DEMO: list[Message] = [
    {"role": "user", "content": "12*34"},
    {"role": "assistant", "content": BAD_CALL},
    {"role": "tool", "name": "calc", "content": "error: ValueError: expected a*b, got '12-34'"},
    {"role": "assistant", "content": CALL},
    {"role": "tool", "name": "calc", "content": "408"},
    {"role": "assistant", "content": "=408"},
]
SAID = [m["content"] for m in DEMO if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def ctok() -> PreTrainedTokenizerFast:
    tokenizer = load_recipe(RECIPE).config.tokenizer
    assert isinstance(tokenizer, CharTokenizer)
    return build_char_tokenizer(tokenizer)


def rollout_cfg(**overrides: Any) -> RolloutConfig:
    base: dict[str, Any] = {
        "evaluator": "task.py:Evaluator",
        "group_size": 1,
        "max_turns": 4,
        "prompt_field": "messages",
        "check_transcript": True,
    }
    return RolloutConfig(**{**base, **overrides})


def demo_item(messages: list[Message], **fields: Any) -> DataItem:
    return DataItem(key="0:3", index=3, epoch=0, fields={"messages": messages, **fields})


def sft_worker(tok: PreTrainedTokenizerFast, scripted: Any, **overrides: Any) -> SFTWorker:
    def never(call: Any) -> Any:
        raise AssertionError("the SFT worker generated")

    return SFTWorker(
        rollout_cfg(**overrides),
        tokenizer=tok,
        generator=scripted(never),
        evaluator=lambda i, t: 0.0,
        tools=[Tool(calc)],
    )


def turn_of(tok: PreTrainedTokenizerFast, text: str) -> GeneratedTurn:
    """What a model that says ``text`` and stops generates: its tokens, then EOS."""
    ids = [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]
    return GeneratedTurn(
        output_ids=ids, logprobs=[-0.1] * len(ids), finish_reason="stop", weight_version=2
    )


async def one(worker: RolloutWorker, item: DataItem) -> Trajectory:
    (traj,) = (await worker.run_group(item, TOKEN, group_id="g")).trajectories
    return traj


def assistant_positions(traj: Trajectory, which: str = "all") -> list[int]:
    """0/1 per token: 1 on the tokens of every assistant turn (or only the last one)."""
    turns = [i for i, t in enumerate(traj.turns) if t.role == "assistant"]
    keep = set(turns if which == "all" else turns[-1:])
    return [int(i in keep) for i, t in enumerate(traj.turns) for _ in t.token_ids]


async def test_loss_covers_exactly_every_assistant_turn(
    ctok: PreTrainedTokenizerFast, scripted: Any
) -> None:
    traj = await one(sft_worker(ctok, scripted), demo_item(DEMO))
    assert traj.status is Status.OK, traj.failure_detail
    roles = [t.role for t in traj.turns]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert [t.text for t in traj.turns if t.role == "assistant"] == SAID
    assert traj.loss_mask == assistant_positions(traj)
    for turn, text in zip([t for t in traj.turns if t.role == "assistant"], SAID, strict=True):
        assert turn.token_ids == turn_of(ctok, text).output_ids  # words, then EOS
        assert turn.loss_mask == [1] * len(turn.token_ids)
    # the tool-call tags are one token each, and stay in decoded text
    call_ids = traj.turns[3].token_ids
    assert call_ids[0] == ctok.convert_tokens_to_ids("<tool_call>")
    assert ctok.decode(call_ids, skip_special_tokens=True) == CALL
    assert len(call_ids) == 29  # 24 tokens of JSON, the tags and EOS


async def test_last_turn_only(ctok: PreTrainedTokenizerFast, scripted: Any) -> None:
    traj = await one(sft_worker(ctok, scripted, train_turns="last"), demo_item(DEMO))
    assert traj.status is Status.OK, traj.failure_detail
    assert traj.loss_mask == assistant_positions(traj, "last")
    assert traj.num_generated == len(turn_of(ctok, "=408").output_ids)


async def test_demonstration_equals_the_rl_sample_of_the_same_conversation(
    ctok: PreTrainedTokenizerFast, scripted: Any
) -> None:
    gen = scripted(lambda call: turn_of(ctok, SAID[call.index]))
    rl = RolloutWorker(
        rollout_cfg(prompt_field="prompt"),
        tokenizer=ctok,
        generator=gen,
        evaluator=lambda i, t: 1.0,
        tools=[Tool(calc)],
    )
    played = await one(rl, DataItem(key="0:3", index=3, epoch=0, fields={"prompt": "12*34"}))
    shown = await one(sft_worker(ctok, scripted), demo_item(DEMO))
    assert played.status is Status.OK, played.failure_detail
    assert [t.role for t in played.turns] == [t.role for t in shown.turns]
    assert played.token_ids == shown.token_ids
    assert played.loss_mask == shown.loss_mask
    # the RL sample ran both calls: one came back as an error
    tools = [t for t in played.turns if t.role == "tool"]
    assert [(t.tool_calls, t.tool_failures) for t in tools] == [(1, 1), (1, 0)]
    assert [t.text for t in tools] == [DEMO[2]["content"], "408"]
    # and both are the whole conversation rendered at once by the chat template
    renderer = ChatRenderer(ctok, tools=[Tool(calc).schema])
    assert shown.token_ids == renderer.conversation(DEMO)


async def test_openai_tool_calls_become_hermes_text(
    ctok: PreTrainedTokenizerFast, scripted: Any
) -> None:
    arguments = [{"expr": "12*34"}, '{"expr": "12*34"}']  # an object, or a JSON string
    for args in arguments:
        call = {"type": "function", "function": {"name": "calc", "arguments": args}}
        demo = [
            {"role": "user", "content": "12*34"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "name": "calc", "content": "408"},
            {"role": "assistant", "content": "=408"},
            {"role": "user", "content": "thanks"},  # after the last assistant turn: left out
        ]
        traj = await one(sft_worker(ctok, scripted), demo_item(demo))
        assert traj.status is Status.OK, traj.failure_detail
        assert traj.turns[1].text == CALL
        assert [t.role for t in traj.turns] == ["user", "assistant", "tool", "assistant"]


@pytest.mark.parametrize(
    "demo",
    [
        [{"role": "user", "content": "12*34"}],  # nothing to learn
        [{"role": "user", "content": "1"}, {"role": "assistant", "tool_calls": [{"x": 1}]}],
        [
            {"role": "user", "content": "1"},
            {"role": "assistant", "tool_calls": [{"name": "calc", "arguments": "{not json"}]},
        ],
        [{"role": "user", "content": "1"}, {"role": "assistant", "content": ["not text"]}],
    ],
)
async def test_malformed_demonstrations_are_bad_items(
    ctok: PreTrainedTokenizerFast,
    scripted: Any,
    failed: Callable[[Trajectory, FailureReason], None],
    demo: list[Message],
) -> None:
    failed(await one(sft_worker(ctok, scripted), demo_item(demo)), FailureReason.BAD_ITEM)


async def test_token_limit_cuts_inside_the_conversation(
    ctok: PreTrainedTokenizerFast, scripted: Any
) -> None:
    full = await one(sft_worker(ctok, scripted), demo_item(DEMO))
    lengths = [len(t.token_ids) for t in full.turns]
    limit = sum(lengths[:3]) + 5  # five tokens into the second call
    traj = await one(sft_worker(ctok, scripted, max_total_tokens=limit), demo_item(DEMO))
    assert traj.status is Status.OK, traj.failure_detail
    assert [t.role for t in traj.turns] == ["user", "assistant", "tool", "assistant"]
    assert traj.turns[-1].finish_reason == "length"
    assert traj.turns[-1].token_ids == full.turns[3].token_ids[:5]
    assert traj.num_tokens == limit
    # a limit that falls on a tool turn keeps what comes before it
    traj = await one(
        sft_worker(ctok, scripted, max_total_tokens=sum(lengths[:2]) + 1), demo_item(DEMO)
    )
    assert [t.role for t in traj.turns] == ["user", "assistant"]


def zero(item: DataItem, trajectory: Trajectory) -> float:
    return 0.0


class SeamWorker(SFTWorker):
    """Re-tokenizes a follow-up with a stray token: a seam the chat template does not have."""

    def render_followup(self, messages: list[Message], generated_ids: list[int]) -> list[int]:
        return [self.eos_token_id or 0, *super().render_followup(messages, generated_ids)]


async def test_the_transcript_check_catches_a_seam(
    ctok: PreTrainedTokenizerFast,
    scripted: Any,
    failed: Callable[[Trajectory, FailureReason], None],
) -> None:
    worker = SeamWorker(
        rollout_cfg(), tokenizer=ctok, generator=scripted(lambda c: None), evaluator=zero
    )
    traj = await one(worker, demo_item(DEMO))
    failed(traj, FailureReason.FORMAT_ERROR)
    assert "token-exact" in traj.failure_detail
    worker = SeamWorker(
        rollout_cfg(check_transcript=False),
        tokenizer=ctok,
        generator=scripted(lambda c: None),
        evaluator=zero,
    )
    assert (await one(worker, demo_item(DEMO))).status is Status.OK


async def test_the_check_takes_the_models_turns_as_said(
    ctok: PreTrainedTokenizerFast, scripted: Any
) -> None:
    """A special token inside a turn, and a word spelled in pieces, are the model's output."""
    head = ctok.encode("<tool_call>", add_special_tokens=False)
    pieces = ctok.convert_tokens_to_ids(list('{"name":'))
    rest = ctok.encode('"calc","arguments":{"expr":"12*34"}}</tool_call>', add_special_tokens=False)
    call = [*head, *pieces, *rest, ctok.eos_token_id]
    answer = turn_of(ctok, "=4<user>08")
    turns = [
        GeneratedTurn(
            output_ids=call, logprobs=[-0.1] * len(call), finish_reason="stop", weight_version=2
        ),
        answer,
    ]
    rl = RolloutWorker(
        rollout_cfg(prompt_field="prompt"),
        tokenizer=ctok,
        generator=scripted(lambda c: turns[c.index]),
        evaluator=zero,
        tools=[Tool(calc)],
    )
    traj = await one(rl, DataItem(key="0:3", index=3, epoch=0, fields={"prompt": "12*34"}))
    assert traj.status is Status.OK, traj.failure_detail
    assert [t.role for t in traj.turns] == ["user", "assistant", "tool", "assistant"]
    assert traj.turns[1].token_ids == call  # kept exactly as generated
    assert traj.turns[2].text == "408"
    assert ctok.convert_tokens_to_ids("<user>") in traj.turns[3].token_ids


async def test_a_sample_the_budget_stops_after_a_tool_result_passes_the_check(
    ctok: PreTrainedTokenizerFast, scripted: Any
) -> None:
    """No room for the answer: the sample ends with the tool result and the generation prompt."""
    gen = scripted(lambda call: turn_of(ctok, CALL))
    prompt = ChatRenderer(ctok).prompt([{"role": "user", "content": "12*34"}])
    limit = len(prompt) + len(turn_of(ctok, CALL).output_ids) + 3  # the follow-up is longer
    rl = RolloutWorker(
        rollout_cfg(prompt_field="prompt", max_total_tokens=limit),
        tokenizer=ctok,
        generator=gen,
        evaluator=zero,
        tools=[Tool(calc)],
    )
    traj = await one(rl, DataItem(key="0:3", index=3, epoch=0, fields={"prompt": "12*34"}))
    assert traj.status is Status.OK, traj.failure_detail
    assert [t.role for t in traj.turns] == ["user", "assistant", "tool"]
    assert traj.token_ids[-1] == ctok.convert_tokens_to_ids("<assistant>")
    assert len(gen.calls) == 1
