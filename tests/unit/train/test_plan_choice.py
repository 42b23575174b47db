"""Choosing between packed and padded micro-batch plans by their cost (pure logic on lengths)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexrl_async.train.packing_plan import (
    PlanCosts,
    cheapest_plan,
    micro_batch_cost,
    plan_cost,
    plan_micro_batches,
    plan_padded_micro_batches,
)

DENSE = PlanCosts(token=1.0, pair=0.01, forward=50.0)
"""A mask: a packed micro-batch attends over all ``N²`` pairs."""
VARLEN = PlanCosts(token=1.0, pair=0.01, forward=50.0, dense=False)


def _demo_lengths(rows: int = 256, seed: int = 0) -> list[int]:
    """The reverse-digits demo: a 4-token prompt and 1-3 response tokens."""
    rng = random.Random(seed)
    return [4 + rng.choice([1, 2, 3, 3, 3]) for _ in range(rows)]


def test_a_micro_batch_costs_its_slots_and_attention_pairs() -> None:
    sizes = [3, 5, 2]
    # padded: 3 rows x 5 = 15 slots, 15 x 5 = 75 pairs
    assert micro_batch_cost(sizes, packed=False, costs=DENSE) == pytest.approx(50 + 15 + 0.75)
    # packed with a mask: 10 slots, 10 x 10 pairs
    assert micro_batch_cost(sizes, packed=True, costs=DENSE) == pytest.approx(50 + 10 + 1.0)
    # packed with a varlen kernel: each row's own 9 + 25 + 4 pairs
    assert micro_batch_cost(sizes, packed=True, costs=VARLEN) == pytest.approx(50 + 10 + 0.38)
    plan = [[0, 1], [2]]
    expected = micro_batch_cost([3, 5], packed=False, costs=DENSE) + micro_batch_cost(
        [2], packed=False, costs=DENSE
    )
    assert plan_cost(sizes, plan, packed=False, costs=DENSE) == pytest.approx(expected)
    assert plan_cost(sizes, [[], [0]], packed=True, costs=DENSE) == pytest.approx(53.09)


def test_many_short_rows_under_a_mask_are_padded_in_length_buckets() -> None:
    lengths = _demo_lengths()
    packed, plan = cheapest_plan(lengths, 8192, DENSE)
    assert not packed
    assert plan == plan_padded_micro_batches(lengths, 8192)
    assert len(plan) == 1  # 256 rows x 7 slots fit the budget: one forward
    # 700 slots: rows longest first, 100 of 7 slots a micro-batch, each padded to its longest
    packed, plan = cheapest_plan(lengths, 700, DENSE)
    assert not packed
    assert [max(lengths[r] for r in rows) for rows in plan] == [7, 7, 5]


def test_a_varlen_kernel_or_no_cost_model_always_packs() -> None:
    lengths = _demo_lengths()
    assert cheapest_plan(lengths, 8192, VARLEN) == (True, plan_micro_batches(lengths, 8192))
    assert cheapest_plan(lengths, 8192, None) == (True, plan_micro_batches(lengths, 8192))


def test_packing_wins_under_a_mask_when_padding_would_cost_more() -> None:
    # one long row with short ones: padding all to 100 costs 3x the slots of packing them
    lengths = [100, 1, 1]
    assert cheapest_plan(lengths, 1000, DENSE) == (True, [[0, 1, 2]])
    # a fixed cost per forward large enough makes fewer forwards win too
    costly = PlanCosts(token=1.0, pair=0.0, forward=1e6)
    packed, plan = cheapest_plan([10, 10, 1, 1, 1, 1], 12, costly)
    assert packed
    assert len(plan) < len(plan_padded_micro_batches([10, 10, 1, 1, 1, 1], 12))


def test_ties_go_to_packing() -> None:
    assert cheapest_plan([4, 4], 8, DENSE)[0] is False  # same slots, padded attention cheaper
    assert cheapest_plan([4, 4], 8, PlanCosts(token=1.0, pair=0.0))[0] is True


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=80), min_size=1, max_size=40),
    budget=st.integers(min_value=1, max_value=400),
    pair=st.sampled_from([0.0, 0.001, 0.01, 0.1]),
    forward=st.sampled_from([0.0, 10.0, 1000.0]),
    dense=st.booleans(),
    min_count=st.integers(min_value=1, max_value=6),
)
def test_the_chosen_plan_is_the_cheaper_candidate_and_covers_every_row_once(
    lengths: list[int], budget: int, pair: float, forward: float, dense: bool, min_count: int
) -> None:
    costs = PlanCosts(token=1.0, pair=pair, forward=forward, dense=dense)
    packed, plan = cheapest_plan(lengths, budget, costs, min_count=min_count)
    assert sorted(r for rows in plan for r in rows) == list(range(len(lengths)))
    assert all(plan)
    assert len(plan) >= min(min_count, len(lengths))
    for rows in plan:
        sizes = [lengths[r] for r in rows]
        slots = sum(sizes) if packed else len(sizes) * max(sizes)
        assert slots <= budget or len(rows) == 1
    # the layout is chosen before min_count splits: the same for every min_count
    assert cheapest_plan(lengths, budget, costs)[0] is packed
    candidates = {
        True: plan_cost(lengths, plan_micro_batches(lengths, budget), packed=True, costs=costs),
        False: plan_cost(
            lengths, plan_padded_micro_batches(lengths, budget), packed=False, costs=costs
        ),
    }
    assert candidates[packed] <= candidates[not packed]
    assert cheapest_plan(lengths, budget, costs, min_count=min_count) == (packed, plan)
