from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexrl_async.core.records import (
    FailureReason,
    Group,
    Status,
    TrainBatch,
    Trajectory,
    Turn,
    VersionSpan,
    VersionToken,
    from_msgpack,
    to_msgpack,
)

ids = st.lists(st.integers(0, 50_000), max_size=12)


@st.composite
def turns(draw: st.DrawFn) -> Turn:
    tokens = draw(ids)
    n = len(tokens)
    role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
    logprobs = None
    if role == "assistant":
        logprobs = draw(st.lists(st.floats(-50, 0), min_size=n, max_size=n))
    mask = [1 if role == "assistant" else 0] * n
    spans = [VersionSpan(start=0, end=n, version=draw(st.integers(0, 9)))] if n else []
    return Turn(role=role, token_ids=tokens, loss_mask=mask, logprobs=logprobs, versions=spans)


@st.composite
def trajectories(draw: st.DrawFn) -> Trajectory:
    failed = draw(st.booleans())
    return Trajectory(
        group_id=draw(st.text(min_size=1, max_size=8)),
        item_key=draw(st.text(max_size=8)),
        sample_index=draw(st.integers(0, 16)),
        token=VersionToken(lease_id=draw(st.integers(0, 99)), version=draw(st.integers(0, 9))),
        turns=draw(st.lists(turns(), max_size=4)),
        reward=draw(st.floats(-10, 10)),
        metrics=draw(st.dictionaries(st.text(max_size=5), st.floats(-1, 1), max_size=3)),
        status=Status.FAILED if failed else Status.OK,
        failure=draw(st.sampled_from(list(FailureReason))) if failed else None,
    )


@given(trajectories())
def test_trajectory_round_trips_msgpack_and_json(traj: Trajectory) -> None:
    assert from_msgpack(to_msgpack(traj), Trajectory) == traj
    assert msgspec.json.decode(msgspec.json.encode(traj), type=Trajectory) == traj


@given(st.lists(trajectories(), min_size=1, max_size=4), st.integers(0, 20))
def test_batch_round_trips(trajs: list[Trajectory], step: int) -> None:
    token = VersionToken(lease_id=1, version=0, max_step=3)
    batch = TrainBatch(
        step=step, groups=[Group(group_id="g", item_key="0:1", token=token, trajectories=trajs)]
    )
    assert from_msgpack(to_msgpack(batch), TrainBatch) == batch


def test_turn_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 2 tokens"):
        Turn(role="user", token_ids=[1, 2], loss_mask=[0])
    with pytest.raises(msgspec.ValidationError, match="logprobs has 1 entries"):
        msgspec.json.decode(
            b'{"role":"assistant","token_ids":[1,2],"loss_mask":[1,1],"logprobs":[0.0]}', type=Turn
        )


def test_failed_needs_reason_and_ok_needs_finite_reward() -> None:
    token = VersionToken(lease_id=0, version=0)
    with pytest.raises(ValueError, match="failure reason"):
        Trajectory(group_id="g", item_key="k", sample_index=0, token=token, status=Status.FAILED)
    with pytest.raises(ValueError, match="finite"):
        Trajectory(group_id="g", item_key="k", sample_index=0, token=token, reward=math.nan)


def test_head_version_and_staleness() -> None:
    def traj(versions: list[int]) -> Trajectory:
        turn = Turn(
            role="assistant",
            token_ids=list(range(len(versions))),
            loss_mask=[1] * len(versions),
            versions=[VersionSpan(start=i, end=i + 1, version=v) for i, v in enumerate(versions)],
        )
        return Trajectory(group_id="g", item_key="k", sample_index=0, token=token, turns=[turn])

    token = VersionToken(lease_id=0, version=2)
    group = Group(group_id="g", item_key="k", token=token, trajectories=[traj([3, 4]), traj([5])])
    assert group.head_version == 3
    assert TrainBatch(step=4, groups=[group]).staleness == [1]
    assert traj([]).head_version == 2  # no tokens: the lease version
