"""Packing plans: rank balance, packed and padded micro-batches, padding fractions."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexrl_async.train.packing_plan import (
    balance_ranks,
    padding_fraction,
    plan_micro_batches,
    plan_padded_micro_batches,
)

lengths_st = st.lists(st.integers(min_value=1, max_value=300), min_size=0, max_size=60)


def _flat(plan: list[list[int]]) -> list[int]:
    return sorted(i for group in plan for i in group)


@given(lengths=lengths_st, world_size=st.integers(min_value=1, max_value=9))
def test_ranks_get_every_row_once_balanced_within_the_longest_row(
    lengths: list[int], world_size: int
) -> None:
    ranks = balance_ranks(lengths, world_size)
    assert len(ranks) == world_size
    assert _flat(ranks) == list(range(len(lengths)))
    assert all(rows == sorted(rows) for rows in ranks)
    loads = [sum(lengths[i] for i in rows) for rows in ranks]
    assert max(loads) - min(loads) <= max(lengths, default=0)
    assert balance_ranks(lengths, world_size) == ranks  # deterministic


@given(
    lengths=lengths_st,
    budget=st.integers(min_value=1, max_value=700),
    min_count=st.integers(min_value=1, max_value=12),
)
def test_packed_plan_covers_every_row_once_within_the_budget(
    lengths: list[int], budget: int, min_count: int
) -> None:
    plan = plan_micro_batches(lengths, budget, min_count=min_count)
    assert _flat(plan) == list(range(len(lengths)))
    assert all(plan)
    for rows in plan:
        assert sum(lengths[i] for i in rows) <= budget or len(rows) == 1
    assert len(plan) >= min(min_count, len(lengths))
    assert plan_micro_batches(lengths, budget, min_count=min_count) == plan


@given(
    lengths=lengths_st,
    budget=st.integers(min_value=1, max_value=700),
    min_count=st.integers(min_value=1, max_value=12),
)
def test_padded_plan_covers_every_row_once_within_the_budget(
    lengths: list[int], budget: int, min_count: int
) -> None:
    plan = plan_padded_micro_batches(lengths, budget, min_count=min_count)
    assert _flat(plan) == list(range(len(lengths)))
    for rows in plan:
        assert len(rows) * max(lengths[i] for i in rows) <= budget or len(rows) == 1
    assert len(plan) >= min(min_count, len(lengths))


@given(lengths=lengths_st, budget=st.integers(min_value=1, max_value=700))
def test_packed_plan_is_first_fit_decreasing(lengths: list[int], budget: int) -> None:
    plan = plan_micro_batches(lengths, budget)
    loads = [sum(lengths[i] for i in rows) for rows in plan]
    for k, rows in enumerate(plan):
        assert [lengths[i] for i in rows] == sorted((lengths[i] for i in rows), reverse=True)
        # no row of a later micro-batch fitted into an earlier one when it was placed, so
        # no earlier micro-batch has room for the shortest row of any later one
        later = [lengths[i] for group in plan[k + 1 :] for i in group]
        if later and loads[k] <= budget:
            assert loads[k] + min(later) > budget


def test_packing_examples() -> None:
    lengths = [3, 10, 4, 2, 30]
    assert plan_micro_batches(lengths, 20) == [[4], [1, 2, 0, 3]]
    assert plan_padded_micro_batches(lengths, 20) == [[4], [1, 2], [0, 3]]
    assert plan_micro_batches(lengths, 20, min_count=3) == [[4], [1], [2, 0, 3]]  # 10 | 9
    assert plan_micro_batches([5], 20, min_count=4) == [[0]]  # one row cannot split
    assert balance_ranks([5, 5, 1, 1], 2) == [[0, 2], [1, 3]]
    assert balance_ranks([4], 3) == [[0], [], []]
    assert plan_micro_batches([], 8) == []


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        plan_micro_batches([1], 0)
    with pytest.raises(ValueError, match="budget"):
        plan_padded_micro_batches([1], 0)
    with pytest.raises(ValueError, match="budget"):
        padding_fraction([1], [[0]], packed=True)
    with pytest.raises(ValueError, match="world_size"):
        balance_ranks([1], 0)
    with pytest.raises(ValueError, match="min_count"):
        plan_micro_batches([1], 4, min_count=0)
    with pytest.raises(ValueError, match="one token"):
        plan_micro_batches([3, 0], 4)


def test_padding_fraction_counts_slots_per_layout() -> None:
    lengths = [3, 10, 4, 2, 30]
    # padded: [30] + [10, 4] -> 2 · 10 + [3, 2] -> 2 · 3 = 56 slots for 49 tokens
    padded = padding_fraction(lengths, [[4], [1, 2], [0, 3]], packed=False)
    assert padded == pytest.approx(7 / 56)
    # packed: the long row fills its own (30 slots), the other holds 19 of 20
    assert padding_fraction(lengths, [[4], [1, 2, 0, 3]], packed=True, budget=20) == pytest.approx(
        1 / 50
    )
    assert padding_fraction(lengths, [], packed=False) == 0.0


def _long_tailed(seed: int, rows: int) -> list[int]:
    """Log-normal lengths (median ~245 tokens, a tail into the thousands), like RL rollouts."""
    rng = random.Random(seed)
    return [max(1, min(16_384, int(rng.lognormvariate(5.5, 1.0)))) for _ in range(rows)]


@pytest.mark.parametrize("seed", range(5))
def test_packing_wastes_under_five_percent_on_a_long_tailed_mix(seed: int) -> None:
    lengths = _long_tailed(seed, 512)
    budget = 8192
    packed = plan_micro_batches(lengths, budget)
    padded = plan_padded_micro_batches(lengths, budget)
    packed_frac = padding_fraction(lengths, packed, packed=True, budget=budget)
    padded_frac = padding_fraction(lengths, padded, packed=False)
    assert packed_frac <= 0.05
    assert packed_frac < padded_frac
    assert len(packed) < len(padded)
    # the lower bound on the number of micro-batches is within one
    assert len(packed) <= -(-sum(lengths) // budget) + 1
