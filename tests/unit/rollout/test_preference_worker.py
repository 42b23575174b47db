"""The preference worker: a pair of trajectories (chosen, rejected) from the data, no inference."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from transformers import PreTrainedTokenizerFast

from nexrl_async.config.rollout import RolloutConfig
from nexrl_async.core.records import (
    DataItem,
    FailureReason,
    Group,
    Status,
    Trajectory,
    VersionToken,
)
from nexrl_async.rollout.loading import load_worker
from nexrl_async.rollout.preference_worker import REF_LOGPROB_METRIC, PreferenceWorker
from nexrl_async.train import dpo as train_dpo

Failed = Callable[[Trajectory, FailureReason], None]
TOKEN = VersionToken(lease_id=1, version=2)


def _never_called(call: Any) -> Any:
    raise AssertionError(f"the preference worker called the generator: {call}")


@pytest.fixture
def make(scripted: Any, tok: PreTrainedTokenizerFast) -> Callable[..., PreferenceWorker]:
    def build(cfg: RolloutConfig, **kw: Any) -> PreferenceWorker:
        gen = scripted(_never_called)
        return PreferenceWorker(cfg, tokenizer=tok, generator=gen, evaluator=lambda i, t: 1.0, **kw)

    return build


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


async def _group(worker: PreferenceWorker, item: DataItem) -> Group:
    group = await worker.run_group(item, TOKEN, group_id="g1")
    assert group.group_id == "g1"
    assert group.item_key == item.key
    assert [t.sample_index for t in group.trajectories] == [0, 1]
    return group


async def test_plain_pair(
    make: Callable[..., PreferenceWorker],
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    events: Any,
) -> None:
    worker = make(cfg(apply_chat_template=False), events=events)
    assert worker.generates is False
    group = await _group(worker, item("12+3=", chosen="15", rejected="16"))
    chosen, rejected = group.trajectories
    prompt = encode(tok, "12+3=")
    for traj, text in ((chosen, "15"), (rejected, "16")):
        assert traj.status is Status.OK
        assert traj.turns[0].token_ids == prompt
        assert traj.turns[0].loss_mask == [0] * len(prompt)
        assert traj.turns[1].token_ids == [*encode(tok, text), tok.eos_token_id]
        assert traj.turns[1].loss_mask == [1, 1, 1]
        assert traj.response_text == text
        assert REF_LOGPROB_METRIC not in traj.metrics
    assert sorted(s["sample_index"] for s in events.scores) == [0, 1]


async def test_chat_pair_with_message_completions_and_reference_log_probs(
    make: Callable[..., PreferenceWorker],
    tok: PreTrainedTokenizerFast,
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
) -> None:
    worker = make(cfg())
    messages = [{"role": "user", "content": "1+1?"}]
    group = await _group(
        worker,
        item(
            messages,
            chosen=[{"role": "assistant", "content": "2"}],
            rejected=[{"role": "assistant", "content": "3"}],
            ref_chosen_logprob=-1.5,
            ref_rejected_logprob=-4,
        ),
    )
    chosen, rejected = group.trajectories
    expected = encode(tok, "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert chosen.turns[0].token_ids == expected == rejected.turns[0].token_ids
    assert chosen.response_text == "2"
    assert rejected.response_text == "3"
    assert chosen.metrics[REF_LOGPROB_METRIC] == -1.5
    assert rejected.metrics[REF_LOGPROB_METRIC] == -4.0
    assert REF_LOGPROB_METRIC == train_dpo.REF_LOGPROB_METRIC  # the trainer reads it


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"chosen": "2"}, "no field 'rejected'"),
        ({"chosen": "2", "rejected": {"x": 1}}, "must be text"),
        ({"chosen": "2", "rejected": [{"role": "user", "content": "x"}]}, "assistant message"),
        ({"chosen": "2", "rejected": "3", "ref_rejected_logprob": "nan?"}, "finite number"),
    ],
)
async def test_a_bad_side_fails_as_bad_item(
    make: Callable[..., PreferenceWorker],
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    failed: Failed,
    fields: dict[str, Any],
    detail: str,
) -> None:
    group = await _group(make(cfg(apply_chat_template=False)), item("q", **fields))
    chosen, rejected = group.trajectories
    assert chosen.status is Status.OK
    failed(rejected, FailureReason.BAD_ITEM)
    assert detail in rejected.failure_detail
    assert not group.ok  # the pool drops and replays the pair


async def test_missing_required_fields_fail_both_sides(
    make: Callable[..., PreferenceWorker],
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    failed: Failed,
) -> None:
    worker = make(cfg(apply_chat_template=False), required=["prompt", "chosen", "rejected"])
    group = await _group(worker, item("q", chosen="1"))
    for traj in group.trajectories:
        failed(traj, FailureReason.BAD_ITEM)


def test_a_recipe_names_it(tok: PreTrainedTokenizerFast, scripted: Any, tmp_path: Any) -> None:
    (tmp_path / "evaluator.py").write_text("def evaluate(item, trajectory):\n    return 0.0\n")
    cfg = RolloutConfig(
        evaluator="evaluator.py:evaluate",
        worker="nexrl_async.rollout.preference_worker:PreferenceWorker",
        group_size=1,
    )
    worker = load_worker(cfg, tokenizer=tok, generator=scripted(_never_called), base_dir=tmp_path)
    assert isinstance(worker, PreferenceWorker)


class SlowPreferenceWorker(PreferenceWorker):
    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        time.sleep(0.3)
        return super().render(messages)


async def test_both_sides_time_out(
    make: Callable[..., PreferenceWorker],
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    failed: Failed,
    tok: PreTrainedTokenizerFast,
    scripted: Any,
) -> None:
    worker = SlowPreferenceWorker(
        cfg(sample_timeout_s=0.05, apply_chat_template=False),
        tokenizer=tok,
        generator=scripted(_never_called),
        evaluator=lambda i, t: 1.0,
    )
    group = await _group(worker, item("q", chosen="1", rejected="2"))
    for traj in group.trajectories:
        failed(traj, FailureReason.TIMEOUT)


async def test_cancellation_propagates(
    cfg: Callable[..., RolloutConfig],
    item: Callable[..., DataItem],
    tok: PreTrainedTokenizerFast,
    scripted: Any,
    events: Any,
) -> None:
    worker = SlowPreferenceWorker(
        cfg(apply_chat_template=False),
        tokenizer=tok,
        generator=scripted(_never_called),
        evaluator=lambda i, t: 1.0,
        events=events,
    )
    result: list[Group] = []
    with anyio.move_on_after(0.05) as scope:
        result.append(
            await worker.run_group(item("q", chosen="1", rejected="2"), TOKEN, group_id="g")
        )
    assert scope.cancelled_caught
    assert result == []
    assert events.scores == []  # no sample was reported as scored
