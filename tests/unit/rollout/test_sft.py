"""The SFT worker: trajectories from the data (prompt + reference answer), no inference."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from transformers import PreTrainedTokenizerFast

from nexrl_async.config.rollout import RolloutConfig
from nexrl_async.core.errors import UserCodeError
from nexrl_async.core.records import (
    DataItem,
    FailureReason,
    Status,
    Trajectory,
    Turn,
    VersionSpan,
    VersionToken,
)
from nexrl_async.rollout.loading import load_worker
from nexrl_async.rollout.sft_worker import SFTWorker
from nexrl_async.rollout.tools import Message

TOKEN = VersionToken(lease_id=3, version=5)
Failed = Callable[[Trajectory, FailureReason], None]
RecordingEvents = Any
Maker = Callable[..., tuple[SFTWorker, Any]]


def _never_called(call: Any) -> Any:
    raise AssertionError(f"the SFT worker called the generator: {call}")


@pytest.fixture
def make_worker(scripted: Any) -> Maker:
    """``make_worker(tok, cfg, cls=SFTWorker, **kw)`` -> (worker, generator that must stay idle)."""

    def make(
        tok: PreTrainedTokenizerFast,
        cfg: RolloutConfig,
        *,
        cls: type[SFTWorker] = SFTWorker,
        **kw: Any,
    ) -> tuple[SFTWorker, Any]:
        gen = scripted(_never_called)
        worker = cls(cfg, tokenizer=tok, generator=gen, evaluator=lambda i, t: 1.0, **kw)
        return worker, gen

    return make


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


async def run_one(worker: SFTWorker, item: DataItem) -> Trajectory:
    group = await worker.run_group(item, TOKEN, group_id="g3")
    assert group.group_id == "g3"
    assert group.item_key == item.key
    assert group.token == TOKEN
    assert len(group.trajectories) == 1
    return group.trajectories[0]


async def test_plain_prompt_then_answer_with_eos(
    make_worker: Maker,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    events: RecordingEvents,
) -> None:
    # group_size 2 in the config: still one sample per item
    worker, gen = make_worker(tok, cfg(apply_chat_template=False), events=events)
    traj = await run_one(worker, item("12+3=", answer="15"))
    assert traj.status is Status.OK
    assert traj.reward == 0.0
    assert traj.sample_index == 0
    prompt, answer = traj.turns
    assert prompt == Turn(role="user", token_ids=encode(tok, "12+3="), loss_mask=[0] * len("12+3="))
    ids = [*encode(tok, "15"), tok.eos_token_id]
    assert answer == Turn(
        role="assistant",
        token_ids=ids,
        loss_mask=[1, 1, 1],
        logprobs=None,
        versions=[VersionSpan(start=0, end=3, version=5)],
        text="15",
        finish_reason="stop",
    )
    assert traj.head_version == 5
    assert traj.num_generated == 3
    assert traj.response_text == "15"
    assert gen.calls == []
    assert events.scores == [
        {"group_id": "g3", "sample_index": 0, "reward": 0.0, "status": Status.OK, "failure": None}
    ]
    assert events.turns == []


async def test_chat_template_prompt_with_system_prompt(
    make_worker: Maker,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
) -> None:
    worker, _ = make_worker(tok, cfg(system_prompt="Be brief."))
    traj = await run_one(worker, item("1+1?", answer="2"))
    expected = encode(
        tok,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n",
    )
    assert traj.turns[0].token_ids == expected
    assert traj.turns[1].token_ids == [*encode(tok, "2"), tok.eos_token_id]
    assert traj.loss_mask == [0] * len(expected) + [1, 1]


async def test_numeric_answer_is_text(
    make_worker: Maker,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
) -> None:
    worker, _ = make_worker(tok, cfg(apply_chat_template=False))
    traj = await run_one(worker, item("6*7", answer=42))
    assert traj.turns[1].token_ids == [*encode(tok, "42"), tok.eos_token_id]


class SolutionWorker(SFTWorker):
    completion_field = "solution"
    append_eos = False

    def format_query(self, item: DataItem) -> list[Message] | str:
        return f"Q: {item.fields['question']}"


async def test_subclass_picks_the_fields_and_drops_eos(
    make_worker: Maker, tok: PreTrainedTokenizerFast, cfg: Callable[..., RolloutConfig]
) -> None:
    worker, _ = make_worker(tok, cfg(apply_chat_template=False), cls=SolutionWorker)
    item = DataItem(key="0:1", index=1, epoch=0, fields={"question": "a", "solution": "bc"})
    traj = await run_one(worker, item)
    assert traj.turns[0].token_ids == encode(tok, "Q: a")
    assert traj.turns[1].token_ids == encode(tok, "bc")


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "1+1?"},  # no answer
        {"prompt": "1+1?", "answer": None},
        {"prompt": "1+1?", "answer": ["2"]},  # not text
        {"prompt": "1+1?", "answer": True},
        {"answer": "2"},  # no prompt
    ],
)
async def test_malformed_items_are_bad_items(
    make_worker: Maker,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    failed: Failed,
    fields: dict[str, Any],
) -> None:
    worker, gen = make_worker(tok, cfg(apply_chat_template=False))
    traj = await run_one(worker, DataItem(key="0:0", index=0, epoch=0, fields=fields))
    failed(traj, FailureReason.BAD_ITEM)
    assert gen.calls == []


async def test_missing_required_field_is_a_bad_item(
    make_worker: Maker,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    failed: Failed,
    events: RecordingEvents,
) -> None:
    worker, _ = make_worker(tok, cfg(), required=["answer", "id"], events=events)
    traj = await run_one(worker, item("1+1?", answer="2"))
    failed(traj, FailureReason.BAD_ITEM)
    assert "id" in traj.failure_detail
    assert events.scores[0]["failure"] is FailureReason.BAD_ITEM


class BrokenRender(SFTWorker):
    def render(self, messages: list[Message]) -> list[int]:
        raise RuntimeError("template exploded")


class BadMask(SFTWorker):
    def loss_mask(self, turns: list[Turn]) -> list[Turn]:
        return turns[:1]


async def test_hook_errors_are_format_errors_and_bad_masks_fail(
    make_worker: Maker,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    failed: Failed,
) -> None:
    worker, _ = make_worker(tok, cfg(), cls=BrokenRender)
    failed(await run_one(worker, item(answer="2")), FailureReason.FORMAT_ERROR)
    worker, _ = make_worker(tok, cfg(), cls=BadMask)
    traj = await run_one(worker, item(answer="2"))
    assert traj.status is Status.FAILED
    assert "loss_mask" in traj.failure_detail


async def test_token_limit_rejects_long_prompts_and_cuts_long_answers(
    make_worker: Maker,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    failed: Failed,
) -> None:
    worker, _ = make_worker(tok, cfg(apply_chat_template=False, max_total_tokens=6))
    failed(await run_one(worker, item("123456", answer="1")), FailureReason.PROMPT_REJECTED)
    traj = await run_one(worker, item("1234", answer="987"))
    assert traj.turns[1].token_ids == encode(tok, "98")
    assert traj.turns[1].finish_reason == "length"
    assert traj.num_tokens == 6
    # the model's context length is the limit when rollout.max_total_tokens is unset
    worker, _ = make_worker(tok, cfg(apply_chat_template=False), context_length=5)
    failed(await run_one(worker, item("12345", answer="1")), FailureReason.PROMPT_REJECTED)


class SlowRender(SFTWorker):
    def render(self, messages: list[Message]) -> list[int]:
        time.sleep(0.3)
        return super().render(messages)


async def test_sample_timeout(
    make_worker: Maker,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    failed: Failed,
) -> None:
    worker, _ = make_worker(tok, cfg(sample_timeout_s=0.05), cls=SlowRender)
    traj = await run_one(worker, item(answer="2"))
    failed(traj, FailureReason.TIMEOUT)
    assert "render" in traj.failure_detail


async def test_cancellation_propagates(
    make_worker: Maker,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    events: RecordingEvents,
) -> None:
    worker, _ = make_worker(tok, cfg(), cls=SlowRender, events=events)
    result: list[Any] = []
    with anyio.move_on_after(0.05) as scope:
        result.append(await worker.run_group(item(answer="2"), TOKEN, group_id="g"))
    assert scope.cancelled_caught
    assert result == []
    assert events.scores == []


def test_tokenizer_without_eos_is_a_user_code_error(
    scripted: Any, tok: PreTrainedTokenizerFast, cfg: Callable[..., RolloutConfig]
) -> None:
    class NoEos:
        eos_token_id = None

        def __getattr__(self, name: str) -> Any:
            return getattr(tok, name)

    with pytest.raises(UserCodeError, match="eos_token_id"):
        SFTWorker(
            cfg(), tokenizer=NoEos(), generator=scripted(_never_called), evaluator=lambda i, t: 0.0
        )


async def test_load_worker_builds_it_from_a_module_reference(
    scripted: Any,
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    tmp_path: Path,
) -> None:
    (tmp_path / "evaluator.py").write_text(
        "class Evaluator:\n    def evaluate(self, item, trajectory):\n        return 1.0\n"
    )
    rollout = cfg(
        worker="nexrl_async.rollout.sft_worker:SFTWorker", group_size=1, apply_chat_template=False
    )
    worker = load_worker(
        rollout,
        tokenizer=tok,
        generator=scripted(_never_called),
        base_dir=tmp_path,
        required=["answer"],
    )
    assert isinstance(worker, SFTWorker)
    traj = await run_one(worker, item("7", answer="7"))
    assert traj.ok
    assert traj.reward == 0.0  # the evaluator is not called
