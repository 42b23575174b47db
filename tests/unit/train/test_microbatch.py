from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.microbatch import (
    collate,
    micro_batch_metrics,
    micro_batches,
    padding_frac,
    plan_micro_batches,
    split_minibatches,
)
from nexrl_async.train.tensors import sequences_from_batch


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
    budget=st.integers(min_value=1, max_value=200),
    packing=st.booleans(),
    offset=st.integers(min_value=0, max_value=3),
)
def test_plan_covers_every_row_once_and_respects_the_budget(
    lengths: list[int], budget: int, packing: bool, offset: int
) -> None:
    t = torch.tensor([7] * offset + lengths)  # rows need not start at 0
    rows = list(range(offset, offset + len(lengths)))
    plan = plan_micro_batches(t, rows, budget, packing=packing)
    assert sorted(r for mb in plan for r in mb) == rows
    for mb in plan:
        sizes = [int(t[r]) for r in mb]
        cost = sum(sizes) if packing else len(mb) * max(sizes)
        assert cost <= budget or len(mb) == 1


def test_plan_groups_longest_first_and_a_long_row_goes_alone() -> None:
    lengths = torch.tensor([3, 10, 4, 2, 30])
    rows = [0, 1, 2, 3, 4]
    assert plan_micro_batches(lengths, rows, 20, packing=False) == [[4], [1, 2], [0, 3]]
    assert plan_micro_batches(lengths, rows, 20) == [[4], [1, 2, 0, 3]]  # 19 tokens packed
    assert plan_micro_batches(lengths, [0, 3], 1000) == [[0, 3]]
    with pytest.raises(ValueError):
        plan_micro_batches(lengths, [0], 0)


def test_padding_frac_counts_padding_or_unused_budget() -> None:
    lengths = torch.tensor([3, 10, 4, 2, 30])
    padded = [[4], [1, 2], [0, 3]]  # slots 30 + 20 + 6
    assert padding_frac(lengths, padded, token_budget=20, packing=False) == pytest.approx(
        1 - 49 / 56
    )
    packed = [[4], [1, 2, 0, 3]]  # slots max(20, 30) + 20
    assert padding_frac(lengths, packed, token_budget=20) == pytest.approx(1 - 49 / 50)


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


@pytest.mark.parametrize("packing", [True, False])
def test_collate_packs_only_when_asked(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch], packing: bool
) -> None:
    seq = sequences_from_batch(
        make_batch([make_traj("g", 0, [1], [4, 5, 6, 7]), make_traj("g", 1, [1], [4])]),
        pad_token_id=0,
    )
    mb = collate(seq, [1, 0], torch.device("cpu"), packing=packing)
    assert mb.input_ids.tolist() == [[1, 4, 0, 0, 0], [1, 4, 5, 6, 7]]  # padded view either way
    if not packing:
        assert mb.packed is None
        return
    assert mb.packed is not None
    assert mb.packed.input_ids.tolist() == [[1, 4, 1, 4, 5, 6, 7]]
    assert mb.packed.position_ids.tolist() == [[0, 1, 0, 1, 2, 3, 4]]
    assert collate(seq, [], torch.device("cpu")).packed is None


def test_micro_batch_metrics_follow_the_layout(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> None:
    seq = sequences_from_batch(  # lengths 9, 2, 3
        make_batch(
            [make_traj("g", 0, [1], [4] * 8), make_traj("g", 1, [1], [4])],
            [make_traj("h", 0, [1, 5], [6])],
        ),
        pad_token_id=0,
    )
    halves = split_minibatches(seq.size, 2)  # [0, 1], [2]
    packed = micro_batch_metrics(seq, halves, token_budget=18, packing=True)
    assert packed == {"train/padding_frac": pytest.approx(1 - 14 / 36), "train/micro_batches": 2}
    padded = micro_batch_metrics(seq, halves, token_budget=18, packing=False)
    assert padded == {"train/padding_frac": pytest.approx(1 - 14 / 21), "train/micro_batches": 2}


@pytest.mark.parametrize("packing", [True, False])
def test_min_count_splits_micro_batches_for_lockstep_ranks(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch], packing: bool
) -> None:
    seq = sequences_from_batch(
        make_batch([make_traj("g", i, [1], [4] * i) for i in range(1, 5)]), pad_token_id=0
    )
    rows = range(seq.size)
    cpu = torch.device("cpu")
    assert len(list(micro_batches(seq, rows, token_budget=100, device=cpu, packing=packing))) == 1
    split = list(
        micro_batches(seq, rows, token_budget=100, device=cpu, packing=packing, min_count=3)
    )
    assert len(split) == 3
    assert sorted(r for mb in split for r in mb.rows.tolist()) == list(rows)
