"""Packing plans: which rows each rank trains, and how a rank's rows form micro-batches.

Pure planning over row lengths (token counts, each >= 1); no torch. Every function returns
*plans*: lists of indices into the ``lengths`` it was given, each index exactly once, computed
deterministically (ties go to the lower index), so every rank that plans the same batch gets
the same answer without talking to the others.

```
ranks = balance_ranks(lengths, world_size)                 # rank r trains rows ranks[r]
mine = [lengths[i] for i in ranks[rank]]
plan = plan_micro_batches(mine, budget)                    # indices into `mine`
padding_fraction(mine, plan, packed=True, budget=budget)   # unused share of the budget
packed, plan = cheapest_plan(mine, budget, costs)          # packed or padded, by cost
```

Two layouts are planned:

- **packed** (:func:`plan_micro_batches`): a micro-batch concatenates its rows into one
  sequence, so it costs the *sum* of its rows' lengths; first-fit decreasing bin packing.
- **padded** (:func:`plan_padded_micro_batches`): a micro-batch of ``b`` rows is right-padded to
  its longest row ``L`` and costs ``b · L``.

In both, a row longer than the budget gets a micro-batch of its own.

Which layout is cheaper depends on the attention (:class:`PlanCosts`, :func:`cheapest_plan`).
A micro-batch costs ``forward + token · slots + pair · pairs``: ``slots`` are the token
positions its linear layers compute (padded: ``b · L``; packed: ``N``, the rows' total), and
``pairs`` the (query, key) pairs its attention computes (padded: ``b · L²``; packed with a
dense ``N × N`` mask: ``N²``; packed with a varlen kernel: ``Σ n²``). Without a varlen kernel a
packed micro-batch pays attention between rows that never see each other, so for many short
rows the padded plan of rows bucketed by length (sorted, next fit) is far cheaper.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

Plan = list[list[int]]
"""Groups of indices into a ``lengths`` sequence (ranks, or micro-batches)."""


def balance_ranks(lengths: Sequence[int], world_size: int) -> Plan:
    """Split rows over ``world_size`` ranks with nearly equal token totals.

    Greedy longest-processing-time: rows are taken longest first and each goes to the rank with
    the fewest tokens so far (the lowest rank on ties). The heaviest and lightest ranks then
    differ by at most the longest row. Each rank's rows are returned in ascending index order;
    a rank gets no rows when there are fewer rows than ranks.
    """
    _check_lengths(lengths)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    ranks: Plan = [[] for _ in range(world_size)]
    heap = [(0, rank) for rank in range(world_size)]
    for row in _longest_first(lengths):
        load, rank = heapq.heappop(heap)
        ranks[rank].append(row)
        heapq.heappush(heap, (load + lengths[row], rank))
    return [sorted(rows) for rows in ranks]


def plan_micro_batches(lengths: Sequence[int], budget: int, *, min_count: int = 1) -> Plan:
    """Packed micro-batches of at most ``budget`` tokens each (first-fit decreasing).

    Rows are taken longest first; each goes into the first micro-batch (in opening order) with
    room for it, else opens a new one. A row longer than the budget is alone in its own.

    ``min_count`` asks for at least that many micro-batches (as far as rows allow): the fullest
    multi-row micro-batch is split in two until there are enough. Sharded ranks need it: every
    rank must run the same number of forward passes (use the maximum over ranks).

    Returns:
        Micro-batches in opening order; rows inside one longest first.
    """
    _check_lengths(lengths)
    _check_budget(budget)
    if sum(lengths) <= budget:  # what first fit gives, without the search
        return _split_to_count(lengths, [_longest_first(lengths)] if lengths else [], min_count)
    plan: Plan = []
    loads: list[int] = []
    for row in _longest_first(lengths):
        n = lengths[row]
        target = next((i for i, load in enumerate(loads) if load + n <= budget), None)
        if target is None:
            plan.append([row])
            loads.append(n)
        else:
            plan[target].append(row)
            loads[target] += n
    return _split_to_count(lengths, plan, min_count)


def plan_padded_micro_batches(lengths: Sequence[int], budget: int, *, min_count: int = 1) -> Plan:
    """Right-padded micro-batches: ``rows · longest_row <= budget`` (a long row goes alone).

    Rows are taken longest first and fill one micro-batch after another (next fit): sorted
    lengths make that near-optimal for padding, since neighbours have similar lengths.
    ``min_count`` as in :func:`plan_micro_batches` (splitting never raises a padded cost).
    """
    _check_lengths(lengths)
    _check_budget(budget)
    if len(lengths) * max(lengths, default=0) <= budget:  # what next fit gives
        return _split_to_count(lengths, [_longest_first(lengths)] if lengths else [], min_count)
    plan: Plan = []
    current: list[int] = []
    longest = 0
    for row in _longest_first(lengths):
        n = lengths[row]
        if current and (len(current) + 1) * max(longest, n) > budget:
            plan.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, n)
    if current:
        plan.append(current)
    return _split_to_count(lengths, plan, min_count)


@dataclass(frozen=True)
class PlanCosts:
    """What a micro-batch costs, in any one unit (e.g. forward FLOPs; only ratios matter)."""

    token: float
    """Per token slot: every layer's linear maps and the LM head."""
    pair: float
    """Per (query, key) pair the attention computes."""
    forward: float = 0.0
    """Per micro-batch: what a forward and backward cost beyond their arithmetic."""
    dense: bool = True
    """A packed micro-batch attends over its whole ``N × N`` (a mask); ``False``: over each
    row's own ``n × n`` (a varlen kernel)."""


def micro_batch_cost(sizes: Sequence[int], *, packed: bool, costs: PlanCosts) -> float:
    """The cost of one micro-batch of rows of ``sizes`` tokens (module docstring)."""
    if packed:
        slots = sum(sizes)
        pairs = slots * slots if costs.dense else sum(n * n for n in sizes)
    else:
        width = max(sizes)
        slots = len(sizes) * width
        pairs = slots * width
    return costs.forward + costs.token * slots + costs.pair * pairs


def plan_cost(
    lengths: Sequence[int], plan: Sequence[Sequence[int]], *, packed: bool, costs: PlanCosts
) -> float:
    """The summed :func:`micro_batch_cost` of a plan's (non-empty) micro-batches."""
    return sum(
        micro_batch_cost([lengths[r] for r in rows], packed=packed, costs=costs)
        for rows in plan
        if rows
    )


def cheapest_plan(
    lengths: Sequence[int], budget: int, costs: PlanCosts | None, *, min_count: int = 1
) -> tuple[bool, Plan]:
    """``(packed, plan)``: the packed or the padded plan of ``lengths``, whichever costs less.

    ``costs=None`` always packs (a varlen kernel, where packing never costs more). Both
    candidates are planned without ``min_count``, so the choice does not depend on it; the
    chosen plan is then split up to ``min_count`` (as in :func:`plan_micro_batches`). Ties
    go to packing.
    """
    packed = plan_micro_batches(lengths, budget)
    if costs is not None:
        padded = plan_padded_micro_batches(lengths, budget)
        packed_cost = plan_cost(lengths, packed, packed=True, costs=costs)
        if plan_cost(lengths, padded, packed=False, costs=costs) < packed_cost:
            return False, _split_to_count(lengths, padded, min_count)
    return True, _split_to_count(lengths, packed, min_count)


def padding_fraction(
    lengths: Sequence[int], plan: Sequence[Sequence[int]], *, packed: bool, budget: int = 0
) -> float:
    """The share of a plan's token slots that hold no real token (0 for an empty plan).

    - ``packed=False``: a micro-batch of ``b`` rows has ``b · longest`` slots (right padding).
    - ``packed=True``: a micro-batch has ``max(budget, its tokens)`` slots: the padding-free
      forward computes no padding, so this is the budget left unused, i.e. how much more work
      the same number of forward passes could have done (what padding to a fixed shape costs).
    """
    _check_lengths(lengths)
    if packed:
        _check_budget(budget)
    tokens = 0
    slots = 0
    for rows in plan:
        if not rows:
            continue
        sizes = [lengths[r] for r in rows]
        tokens += sum(sizes)
        slots += max(budget, sum(sizes)) if packed else len(sizes) * max(sizes)
    return 1.0 - tokens / slots if slots else 0.0


def _split_to_count(lengths: Sequence[int], plan: Plan, min_count: int) -> Plan:
    """Split the heaviest multi-row micro-batch in two until ``plan`` has ``min_count``."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1; got {min_count}")
    while len(plan) < min_count:
        splittable = [i for i, rows in enumerate(plan) if len(rows) > 1]
        if not splittable:
            break
        heaviest = max(splittable, key=lambda i: (sum(lengths[r] for r in plan[i]), -i))
        rows = plan.pop(heaviest)
        # Rows have >= 1 token, so both halves of a split of >= 2 rows are non-empty.
        for half in balance_ranks([lengths[r] for r in rows], 2):
            plan.append(sorted((rows[i] for i in half), key=lambda r: (-lengths[r], r)))
    return plan


def _longest_first(lengths: Sequence[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))


def _check_lengths(lengths: Sequence[int]) -> None:
    bad = next((n for n in lengths if n < 1), None)
    if bad is not None:
        raise ValueError(f"every row needs at least one token; got a length of {bad}")


def _check_budget(budget: int) -> None:
    if budget < 1:
        raise ValueError(f"budget must be >= 1; got {budget}")
