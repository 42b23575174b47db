"""Split a batch into optimizer minibatches, and those into micro-batches by a token budget.

Two steps, so the layout can change without touching the step:

1. :func:`plan_layout` turns row lengths and a token budget into a layout and a *plan*: a list
   of row index lists (:mod:`nexrl_async.train.packing_plan`). Packed (``trainer.packing``):
   a micro-batch holds rows totalling at most the budget (first-fit decreasing). Padded: ``b``
   rows padded to their longest ``L`` cost ``b · L`` (rows bucketed by length). A row longer
   than the budget goes alone. With a cost model (``costs``, from
   :func:`~nexrl_async.train.packing.plan_costs`: models whose packed attention is a dense
   mask) packing picks whichever of the two plans costs less; without one it always packs.
2. :func:`collate` gathers a plan entry's rows into a :class:`MicroBatch` on the device, trimmed
   to its longest row; a packed one also carries the rows concatenated into one sequence
   (:class:`~nexrl_async.train.packing.PackedRows`), which the forward uses instead of the
   padded ``[b, W]`` tensors. Either way per-token results come back as ``[b, W]``, and
   per-token tensors follow with :meth:`MicroBatch.take`.

The loss uses global denominators (see ``algorithms.aggregation``), so the way rows are grouped
never changes the update, only memory and speed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nexrl_async.train import packing_plan as plans
from nexrl_async.train.packing import PackedRows, pack_rows
from nexrl_async.train.prefix_sharing import SharedPrefix, plan_shared_prefix
from nexrl_async.train.tensors import SequenceBatch

Plan = list[list[int]]


@dataclass(frozen=True)
class MicroBatch:
    """Some rows of a :class:`SequenceBatch`, right-padded to their longest, on the device."""

    rows: Tensor
    """``[b]`` int64 (CPU): row indices into the sequence batch."""
    width: int
    """``W``: the longest row of the micro-batch."""
    input_ids: Tensor
    """``[b, W]`` int64 on the device."""
    attention_mask: Tensor
    """``[b, W]`` int64 on the device."""
    packed: PackedRows | None = None
    """The rows concatenated (padding-free layout), or None for the padded forward."""
    shared: SharedPrefix | None = None
    """Padded rows as shared prefixes and own suffixes (:mod:`~nexrl_async.train.prefix_sharing`),
    or None."""

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def take(self, values: Tensor) -> Tensor:
        """This micro-batch's slice ``[b, W]`` of a batch-wide ``[B, T]`` tensor, on the device."""
        return values[self.rows, : self.width].to(self.device, non_blocking=True)


def split_minibatches(size: int, parts: int) -> Plan:
    """Rows ``0..size-1`` in ``min(parts, size)`` contiguous, nearly equal chunks (in order)."""
    if size < 1 or parts < 1:
        raise ValueError(f"need size >= 1 and parts >= 1; got {size} and {parts}")
    return [chunk.tolist() for chunk in torch.arange(size).tensor_split(min(parts, size))]


def plan_layout(
    lengths: Tensor,
    rows: Sequence[int],
    token_budget: int,
    *,
    packing: bool = True,
    costs: plans.PlanCosts | None = None,
    min_count: int = 1,
) -> tuple[bool, Plan]:
    """``(packed, plan)``: group ``rows`` into micro-batches of at most ``token_budget`` tokens.

    Packed: rows totalling at most the budget (first-fit decreasing). Padded (``packing=False``,
    or packing whose ``costs`` say the padded plan is cheaper): rows are taken longest first and
    a micro-batch grows while ``rows_in_it · longest_row <= token_budget``. Either way a longer
    row goes alone and every row lands in exactly one micro-batch.

    Args:
        lengths: ``[B]`` real tokens per row of the sequence batch.
        rows: the rows to plan (e.g. one minibatch).
        token_budget: tokens (packed) or padded tokens per micro-batch, ``>= 1``.
        packing: plan for the padding-free layout where it pays.
        costs: the cost model that decides whether packing pays
            (:func:`~nexrl_async.train.packing_plan.cheapest_plan`); ``None``: it always does.
        min_count: at least this many micro-batches where rows allow (sharded ranks must run
            the same number of forward passes: pass the maximum over ranks). The layout is
            chosen before this split, so it does not depend on ``min_count``.
    """
    rows = list(rows)
    sizes = [int(n) for n in lengths[rows].tolist()] if rows else []
    if packing:
        packed, local = plans.cheapest_plan(sizes, token_budget, costs, min_count=min_count)
    else:
        packed = False
        local = plans.plan_padded_micro_batches(sizes, token_budget, min_count=min_count)
    return packed, [[rows[i] for i in group] for group in local]


def plan_micro_batches(
    lengths: Tensor,
    rows: Sequence[int],
    token_budget: int,
    *,
    packing: bool = True,
    costs: plans.PlanCosts | None = None,
    min_count: int = 1,
) -> Plan:
    """The plan of :func:`plan_layout` (same arguments), without its layout."""
    return plan_layout(
        lengths, rows, token_budget, packing=packing, costs=costs, min_count=min_count
    )[1]


def padding_frac(
    lengths: Tensor, plan: Sequence[Sequence[int]], *, token_budget: int, packing: bool = True
) -> float:
    """The share of ``plan``'s token slots without a real token (``train/padding_frac``).

    Padded: padding to each micro-batch's longest row. Packed: the budget left unused (the
    padding-free forward computes none; see
    :func:`nexrl_async.train.packing_plan.padding_fraction`).
    """
    return plans.padding_fraction(
        [int(n) for n in lengths.tolist()], plan, packed=packing, budget=token_budget
    )


def micro_batch_metrics(
    seq: SequenceBatch,
    minibatches: Sequence[Sequence[int]],
    *,
    token_budget: int,
    packing: bool,
    costs: plans.PlanCosts | None = None,
) -> dict[str, float]:
    """``train/padding_frac`` (slot-weighted over the minibatches' chosen layouts) and
    ``train/micro_batches`` of one epoch over ``minibatches``."""
    tokens, slots, count = 0, 0.0, 0
    for rows in minibatches:
        packed, plan = plan_layout(seq.lengths, rows, token_budget, packing=packing, costs=costs)
        used = sum(int(seq.lengths[r]) for r in rows)
        frac = padding_frac(seq.lengths, plan, token_budget=token_budget, packing=packed)
        tokens, slots, count = tokens + used, slots + used / (1.0 - frac), count + len(plan)
    return {
        "train/padding_frac": 1.0 - tokens / slots if slots else 0.0,
        "train/micro_batches": float(count),
    }


def collate(
    seq: SequenceBatch,
    rows: Sequence[int],
    device: torch.device,
    *,
    packing: bool = True,
    share_prefix: bool = False,
) -> MicroBatch:
    """The micro-batch of ``rows``: padded to the longest of them (and packed), on ``device``.

    ``share_prefix``: an unpacked micro-batch whose groups share prompts computes each once
    where that pays (:func:`~nexrl_async.train.prefix_sharing.plan_shared_prefix`). No rows give
    an empty ``[0, 0]`` micro-batch (never packed).
    """
    index = torch.tensor(list(rows), dtype=torch.int64)
    width = int(seq.lengths[index].max()) if len(rows) else 0
    input_ids = seq.input_ids[index, :width]
    shared = None
    if share_prefix and not packing and len(rows) > 1:
        shared = plan_shared_prefix(input_ids, seq.lengths[index], seq.group_index[index], device)
    return MicroBatch(
        shared=shared,
        rows=index,
        width=width,
        input_ids=input_ids.to(device, non_blocking=True),
        attention_mask=seq.attention_mask[index, :width].to(device, non_blocking=True),
        packed=pack_rows(input_ids, seq.lengths[index], device) if packing and rows else None,
    )


def micro_batches(
    seq: SequenceBatch,
    rows: Sequence[int],
    *,
    token_budget: int,
    device: torch.device,
    packing: bool = True,
    costs: plans.PlanCosts | None = None,
    min_count: int = 1,
    share_prefix: bool = False,
) -> Iterator[MicroBatch]:
    """Plan ``rows`` (:func:`plan_layout`) and yield their micro-batches one at a time
    (``share_prefix``: see :func:`collate`)."""
    packed, plan = plan_layout(
        seq.lengths, rows, token_budget, packing=packing, costs=costs, min_count=min_count
    )
    for planned in plan:
        yield collate(seq, planned, device, packing=packed, share_prefix=share_prefix)
