"""What a run reports of its agents: turns and tool calls per step and validation, and the
sample dump that shows each conversation role by role."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from nexrl_async.config.model import CharTokenizer
from nexrl_async.core.records import (
    FailureReason,
    Group,
    Status,
    TrainBatch,
    Trajectory,
    Turn,
    VersionToken,
)
from nexrl_async.engine.samples import write_samples
from nexrl_async.engine.stats import agent_metrics, batch_metrics
from nexrl_async.engine.validator import summarize
from nexrl_async.train.build import build_char_tokenizer

TOKEN = VersionToken(lease_id=0, version=0)
TOK = build_char_tokenizer(CharTokenizer(alphabet="0123456789+=*"))


def turn(role: str, text: str, *, calls: int = 0, failures: int = 0) -> Turn:
    ids = TOK.encode(text, add_special_tokens=False)
    return Turn(
        role=role,  # type: ignore[arg-type]
        token_ids=ids,
        loss_mask=[int(role == "assistant")] * len(ids),
        text=None if role == "user" else text,
        tool_name="calc" if role == "tool" else None,
        tool_calls=calls,
        tool_failures=failures,
    )


def with_tools(index: int, reward: float) -> Trajectory:
    turns = [
        turn("user", "12*3"),
        turn("assistant", "12*3"),
        turn("tool", "36", calls=2, failures=1),  # two calls' results, one an error
        turn("assistant", "=36"),
    ]
    return Trajectory(
        group_id="g", item_key="0:1", sample_index=index, token=TOKEN, turns=turns, reward=reward
    )


def direct(index: int) -> Trajectory:
    turns = [turn("user", "12*3"), turn("assistant", "=35")]
    return Trajectory(group_id="g", item_key="0:1", sample_index=index, token=TOKEN, turns=turns)


def test_turns_and_tool_success_per_step() -> None:
    batch = TrainBatch(
        step=0, groups=[Group(group_id="g", item_key="0:1", token=TOKEN, trajectories=[
            with_tools(0, 1.0), direct(1), with_tools(2, 1.0), direct(3)
        ])]
    )  # fmt: skip
    out = batch_metrics(batch)
    assert out["rollout/turns_mean"] == 1.5
    assert out["rollout/tool_calls_mean"] == 1.0  # 4 calls, 4 samples
    assert out["rollout/tool_success_rate"] == 0.5
    assert out["rollout/reward_mean"] == 0.5
    # no tool calls: no success rate (not a misleading 0 or 1)
    assert agent_metrics([direct(0)], "rollout/") == {"rollout/turns_mean": 1.0}
    assert agent_metrics([], "rollout/") == {}


def test_validation_reports_turns_of_scored_samples() -> None:
    failed = Trajectory(
        group_id="g", item_key="0:1", sample_index=2, token=TOKEN, turns=[turn("user", "1")],
        status=Status.FAILED, failure=FailureReason.TIMEOUT,
    )  # fmt: skip
    group = Group(
        group_id="g", item_key="0:1", token=TOKEN,
        trajectories=[with_tools(0, 1.0), direct(1), failed],
    )  # fmt: skip
    out = summarize([group])
    assert out["val/turns_mean"] == 1.5
    assert out["val/tool_success_rate"] == 0.5
    assert math.isclose(out["val/reward_mean"], 1 / 3)


def test_sample_dump_shows_each_conversation_role_by_role(tmp_path: Path) -> None:
    group = Group(group_id="g", item_key="0:1", token=TOKEN, trajectories=[with_tools(0, 1.0)])
    path = tmp_path / "step_000004.jsonl"
    write_samples(path, TrainBatch(step=4, groups=[group]), TOK)
    (row,) = [msgspec.json.decode(line) for line in path.read_bytes().splitlines()]
    assert row["response"] == "=36"
    assert [(c["role"], c["text"]) for c in row["conversation"]] == [
        ("user", "12*3"),
        ("assistant", "12*3"),
        ("tool", "36"),
        ("assistant", "=36"),
    ]
    assert [c["trained"] for c in row["conversation"]] == [0, 4, 0, 3]
    assert row["conversation"][2]["tool_failures"] == 1
    text = path.with_suffix(".txt").read_text()
    assert text.splitlines() == [
        "## group g sample 0 (item 0:1) reward 1",
        "[user] 12*3",
        "[assistant] 12*3",
        "[tool calc] 36",
        "[assistant] =36",
    ]


@pytest.mark.parametrize("count", [0, 20])
def test_sample_dump_caps_and_handles_empty_batches(tmp_path: Path, count: int) -> None:
    trajs = [direct(i) for i in range(count)]
    group = Group(group_id="g", item_key="0:1", token=TOKEN, trajectories=trajs)
    path = tmp_path / "s.jsonl"
    write_samples(path, TrainBatch(step=0, groups=[group]), TOK)
    assert len(path.read_bytes().splitlines()) == min(count, 16)
    assert path.with_suffix(".txt").read_text().count("## group") == min(count, 16)
