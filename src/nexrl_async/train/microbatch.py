"""Split a batch into optimizer minibatches, and those into micro-batches by a token budget.

Two steps, so a padding-free packer can replace the second without touching the step:

1. :func:`plan_micro_batches` turns row lengths and a token budget into a *plan*: a list of row
   index lists. Today's plan is for right padding: a micro-batch of ``b`` rows padded to its
   longest row ``L`` costs ``b · L`` tokens, which must fit the budget (a row longer than the
   budget goes alone).
2. :func:`collate` gathers a plan entry's rows into a :class:`MicroBatch` on the device, trimmed
   to its longest row. Per-token tensors follow with :meth:`MicroBatch.take`.

The loss uses global denominators (see ``algorithms.aggregation``), so the way rows are grouped
never changes the update, only memory and speed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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


def plan_micro_batches(lengths: Tensor, rows: Sequence[int], token_budget: int) -> Plan:
    """Group ``rows`` into padded micro-batches of at most ``token_budget`` tokens each.

    Rows are taken longest first (stable), and a micro-batch grows while
    ``rows_in_it · longest_row <= token_budget``. Every row lands in exactly one micro-batch.

    Args:
        lengths: ``[B]`` real tokens per row of the sequence batch.
        rows: the rows to plan (e.g. one minibatch).
        token_budget: padded tokens per micro-batch, ``>= 1``.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1; got {token_budget}")
    ordered = sorted(rows, key=lambda r: -int(lengths[r]))
    plan: Plan = []
    current: list[int] = []
    longest = 0
    for row in ordered:
        n = int(lengths[row])
        if current and (len(current) + 1) * max(longest, n) > token_budget:
            plan.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, n)
    if current:
        plan.append(current)
    return plan


def collate(seq: SequenceBatch, rows: Sequence[int], device: torch.device) -> MicroBatch:
    """The micro-batch of ``rows``: padded to the longest of them, moved to ``device``."""
    index = torch.tensor(list(rows), dtype=torch.int64)
    width = int(seq.lengths[index].max()) if len(rows) else 0
    return MicroBatch(
        rows=index,
        width=width,
        input_ids=seq.input_ids[index, :width].to(device, non_blocking=True),
        attention_mask=seq.attention_mask[index, :width].to(device, non_blocking=True),
    )


def micro_batches(
    seq: SequenceBatch, rows: Sequence[int], *, token_budget: int, device: torch.device
) -> Iterator[MicroBatch]:
    """Plan ``rows`` and yield their micro-batches one at a time (the packing seam)."""
    for planned in plan_micro_batches(seq.lengths, rows, token_budget):
        yield collate(seq, planned, device)
