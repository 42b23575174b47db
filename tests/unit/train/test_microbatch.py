from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.microbatch import (
    collate,
    micro_batches,
    plan_micro_batches,
    split_minibatches,
)
from nexrl_async.train.tensors import sequences_from_batch


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
    budget=st.integers(min_value=1, max_value=200),
)
def test_plan_covers_every_row_once_and_respects_the_budget(
    lengths: list[int], budget: int
) -> None:
    t = torch.tensor(lengths)
    rows = list(range(len(lengths)))
    plan = plan_micro_batches(t, rows, budget)
    assert sorted(r for mb in plan for r in mb) == rows
    for mb in plan:
        padded = len(mb) * max(lengths[r] for r in mb)
        assert padded <= budget or len(mb) == 1


def test_plan_groups_longest_first_and_a_long_row_goes_alone() -> None:
    lengths = torch.tensor([3, 10, 4, 2, 30])
    assert plan_micro_batches(lengths, [0, 1, 2, 3, 4], 20) == [[4], [1, 2], [0, 3]]
    assert plan_micro_batches(lengths, [0, 3], 1000) == [[0, 3]]
    with pytest.raises(ValueError):
        plan_micro_batches(lengths, [0], 0)


def test_split_minibatches_is_contiguous_and_nearly_equal() -> None:
    assert split_minibatches(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_minibatches(3, 8) == [[0], [1], [2]]
    assert split_minibatches(4, 1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        split_minibatches(0, 1)


def test_collate_trims_to_the_longest_row_and_take_slices_any_tensor(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> None:
    seq = sequences_from_batch(
        make_batch([make_traj("g", 0, [1], [4, 5, 6, 7]), make_traj("g", 1, [1], [4])]),
        pad_token_id=0,
    )
    mb = collate(seq, [1], torch.device("cpu"))
    assert mb.width == 2
    assert mb.input_ids.tolist() == [[1, 4]]
    assert mb.take(seq.loss_mask).tolist() == [[0, 1]]
    all_rows = list(micro_batches(seq, [0, 1], token_budget=4, device=torch.device("cpu")))
    assert [m.rows.tolist() for m in all_rows] == [[0], [1]]
