from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import (
    FailureReason,
    Group,
    Status,
    TrainBatch,
    Trajectory,
    Turn,
    VersionToken,
)
from nexrl_async.train.tensors import sequences_from_batch

PAD = 0


def test_turns_are_concatenated_right_padded_and_aligned(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> None:
    a = make_traj("g", 0, [1, 5], [6, 7, 2], reward=1.0, logprobs=[-0.1, -0.2, -0.3])
    b = make_traj("g", 1, [1, 5], [8, 2], reward=0.0, logprobs=[-0.4, -0.5])
    c = make_traj("h", 0, [1, 9, 9, 9], [3], reward=0.5)
    seq = sequences_from_batch(make_batch([a, b], [c]), pad_token_id=PAD)

    assert seq.size == 3
    assert seq.width == 5
    assert seq.input_ids.tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 2, PAD], [1, 9, 9, 9, 3]]
    assert seq.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0], [1] * 5]
    assert seq.loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    torch.testing.assert_close(
        seq.rollout_logprobs,
        torch.tensor([[0, 0, -0.1, -0.2, -0.3], [0, 0, -0.4, -0.5, 0], [0.0] * 5]),
    )
    assert seq.rollout_mask.tolist() == [
        [False, False, True, True, True],
        [False, False, True, True, False],
        [False] * 5,
    ]
    assert seq.lengths.tolist() == [5, 4, 5]
    assert seq.rewards.tolist() == [1.0, 0.0, 0.5]
    assert seq.group_index.tolist() == [0, 0, 1]
    assert seq.response_lengths.tolist() == [3, 2, 1]


def test_first_token_is_never_trained_and_masked_rollout_logprobs_are_zero(
    make_batch: Callable[..., TrainBatch],
) -> None:
    from nexrl_async.core.records import VersionToken

    turns = [
        Turn(role="assistant", token_ids=[4, 5, 6], loss_mask=[1, 0, 1], logprobs=[-1, -2, -3]),
    ]
    t = Trajectory(
        group_id="g",
        item_key="g",
        sample_index=0,
        token=VersionToken(lease_id=0, version=0),
        turns=turns,
    )
    seq = sequences_from_batch(make_batch([t]), pad_token_id=PAD)
    assert seq.loss_mask.tolist() == [[0, 0, 1]]
    assert seq.rollout_logprobs.tolist() == [[0, 0, -3]]
    assert seq.rollout_mask.tolist() == [[False, False, True]]


def test_failed_trajectory_is_a_train_error(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> None:
    ok = make_traj("g", 0, [1], [2])
    failed = Trajectory(
        group_id="g",
        item_key="g",
        sample_index=1,
        token=ok.token,
        status=Status.FAILED,
        failure=FailureReason.TIMEOUT,
    )
    with pytest.raises(TrainError, match="FAILED"):
        sequences_from_batch(make_batch([ok, failed]), pad_token_id=PAD)


def test_empty_batch_and_empty_trajectory_are_train_errors(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> None:
    with pytest.raises(TrainError, match="no trajectories"):
        sequences_from_batch(TrainBatch(step=3, groups=[]), pad_token_id=PAD)
    empty = Trajectory(
        group_id="g", item_key="g", sample_index=0, token=make_traj("g", 0, [1], [2]).token
    )
    with pytest.raises(TrainError, match="empty"):
        sequences_from_batch(make_batch([empty]), pad_token_id=PAD)


def test_non_finite_server_logprob_counts_as_missing(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> None:
    t = make_traj("g", 0, [1], [2, 3], logprobs=[float("-inf"), -1.0])
    seq = sequences_from_batch(make_batch([t]), pad_token_id=PAD)
    assert seq.rollout_mask.tolist() == [[False, False, True]]
    assert seq.rollout_logprobs.tolist() == [[0.0, 0.0, -1.0]]


_turn = st.builds(
    lambda role, ids, mask, lp: Turn(
        role=role,
        token_ids=ids,
        loss_mask=[m % 3 for m in mask[: len(ids)]] + [0] * (len(ids) - len(mask)),
        logprobs=None if lp is None else [(lp + i) % 5 - 4.5 for i in range(len(ids))],
    ),
    st.sampled_from(["user", "assistant", "tool"]),
    st.lists(st.integers(min_value=1, max_value=50), max_size=6),
    st.lists(st.integers(min_value=0, max_value=5), max_size=6),
    st.none() | st.floats(min_value=0, max_value=4),
)


@given(rows=st.lists(st.lists(_turn, min_size=1, max_size=3), min_size=1, max_size=6))
def test_tensors_match_a_token_by_token_reading_of_the_turns(rows: list[list[Turn]]) -> None:
    rows = [turns for turns in rows if any(t.token_ids for t in turns)]
    if not rows:
        return
    token = VersionToken(lease_id=0, version=0)
    trajs = [
        Trajectory(group_id=f"g{i % 2}", item_key="k", sample_index=i, token=token, turns=turns)
        for i, turns in enumerate(rows)
    ]
    batch = TrainBatch(
        step=0,
        groups=[
            Group(group_id=f"g{g}", item_key="k", token=token, trajectories=trajs[g::2])
            for g in range(min(2, len(trajs)))
        ],
    )
    seq = sequences_from_batch(batch, pad_token_id=0)
    for b, traj in enumerate(batch.trajectories):
        tokens = [
            (tid, m, lp, turn.logprobs is not None)
            for turn in traj.turns
            for tid, m, lp in zip(
                turn.token_ids, turn.loss_mask, turn.logprobs or [0.0] * len(turn.token_ids),
                strict=True,
            )
        ]  # fmt: skip
        assert int(seq.lengths[b]) == len(tokens)
        for t in range(seq.width):
            if t >= len(tokens):
                assert (int(seq.input_ids[b, t]), int(seq.attention_mask[b, t])) == (0, 0)
                assert float(seq.loss_mask[b, t]) == 0.0
                assert not bool(seq.rollout_mask[b, t])
                continue
            tid, m, lp, known = tokens[t]
            loss = 0.0 if t == 0 else float(min(m, 1))
            assert (int(seq.input_ids[b, t]), int(seq.attention_mask[b, t])) == (tid, 1)
            assert float(seq.loss_mask[b, t]) == loss
            assert bool(seq.rollout_mask[b, t]) == (known and loss != 0)
            expected = lp if known and loss != 0 else 0.0
            assert float(seq.rollout_logprobs[b, t]) == pytest.approx(expected, abs=1e-6)
