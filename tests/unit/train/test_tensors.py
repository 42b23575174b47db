from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import (
    FailureReason,
    Status,
    TrainBatch,
    Trajectory,
    Turn,
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
