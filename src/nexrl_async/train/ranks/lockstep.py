"""Ranks walking through their share of a batch in lockstep.

With FSDP2 every forward all-gathers each layer's parameters and every backward reduce-scatters
its gradients, so all ranks must run the same *number* of forwards (and backwards) in the same
order, whatever rows they hold. Each rank therefore:

1. takes its share of the rows (:func:`rank_rows`: balanced by tokens, the same split computed
   independently on every rank);
2. plans its micro-batches, agrees on the largest count over ranks, splits its own plan up to
   that count where its rows allow (``min_count``), and pads the rest with *filler*
   micro-batches (the batch's shortest row) whose results are thrown away (a filler's loss is
   multiplied by 0 before ``backward``, so it adds nothing to any gradient).

At world size 1 both steps are identities and nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel

from nexrl_async.train.logprobs import batch_logprobs, forward_logprobs, model_device
from nexrl_async.train.microbatch import MicroBatch, micro_batches, plan_micro_batches
from nexrl_async.train.packing import plan_costs
from nexrl_async.train.packing_plan import PlanCosts
from nexrl_async.train.ranks.collectives import all_reduce_sum, max_over_ranks
from nexrl_async.train.ranks.sharding import reshard
from nexrl_async.train.ranks.topology import split_rows
from nexrl_async.train.tensors import SequenceBatch


def rank_rows(lengths: Tensor, rows: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of ``rows`` (row indices into a batch whose row lengths are
    ``lengths``), balanced by tokens; all of ``rows`` at world size 1."""
    rows = list(rows)
    if world_size == 1:
        return rows
    share = split_rows([int(lengths[r]) for r in rows], world_size)[rank]
    return [rows[i] for i in share]


def lockstep_micro_batches(
    seq: SequenceBatch,
    rows: Sequence[int],
    *,
    token_budget: int,
    device: torch.device,
    packing: bool,
    world_size: int,
    costs: PlanCosts | None = None,
    share_prefix: bool = False,
) -> Iterator[tuple[MicroBatch, bool]]:
    """``(micro-batch, real)`` pairs: this rank's micro-batches of ``rows``, as many as the
    busiest rank's (split further where rows allow), then fillers (``real = False``).

    ``packing`` and ``costs`` choose the layout (:func:`~nexrl_async.train.microbatch.plan_layout`;
    ranks may choose differently, only their counts must agree). Every rank must call this
    at the same point (one all-reduce when ``world_size > 1``).
    """
    # at world size 1 no other rank's count needs matching: no plan to count
    count = _busiest_count(seq, rows, token_budget, packing, costs) if world_size > 1 else 0
    made = 0
    if rows:
        planned = micro_batches(
            seq,
            rows,
            token_budget=token_budget,
            device=device,
            packing=packing,
            costs=costs,
            min_count=max(count, 1),
            share_prefix=share_prefix,
        )
        for mb in planned:
            made += 1
            yield mb, True
    if count > made:
        filler = filler_micro_batch(seq, device=device, packing=packing)
        for _ in range(count - made):
            yield filler, False


def _busiest_count(
    seq: SequenceBatch,
    rows: Sequence[int],
    token_budget: int,
    packing: bool,
    costs: PlanCosts | None,
) -> int:
    """The most micro-batches any rank plans for its rows (an all-reduce)."""
    own = 0
    if rows:
        own = len(plan_micro_batches(seq.lengths, rows, token_budget, packing=packing, costs=costs))
    return max_over_ranks(own)


def filler_micro_batch(seq: SequenceBatch, *, device: torch.device, packing: bool) -> MicroBatch:
    """A one-row micro-batch of the batch's shortest row (for lockstep padding)."""
    shortest = int(torch.argmin(seq.lengths))
    return next(
        micro_batches(seq, [shortest], token_budget=seq.width, device=device, packing=packing)
    )


@torch.no_grad()
def rank_logprobs(
    model: PreTrainedModel,
    seq: SequenceBatch,
    *,
    rank: int,
    world_size: int,
    token_budget: int,
    temperature: float,
    packing: bool,
    with_entropy: bool = False,
    share_prefix: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[B, T]`` (and entropies) of every row, each rank computing its share.

    ``packing`` packs where it pays for ``model`` (:func:`~nexrl_async.train.packing.plan_costs`).
    The ranks' rows are disjoint and the rest of each rank's result is 0, so a sum over ranks
    assembles the whole batch exactly; every rank gets it (float32, CPU). Eval mode, no grad.
    At world size 1 this is :func:`~nexrl_async.train.logprobs.batch_logprobs`.
    """
    costs = plan_costs(model) if packing else None
    if world_size == 1:
        return batch_logprobs(
            model,
            seq,
            token_budget=token_budget,
            temperature=temperature,
            with_entropy=with_entropy,
            packing=packing,
            costs=costs,
            share_prefix=share_prefix,
        )
    device = model_device(model)
    logprobs = torch.zeros(seq.input_ids.shape, dtype=torch.float32)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    mine = rank_rows(seq.lengths, range(seq.size), rank, world_size)
    was_training = model.training
    model.eval()
    try:
        planned = lockstep_micro_batches(
            seq,
            mine,
            token_budget=token_budget,
            device=device,
            packing=packing,
            world_size=world_size,
            costs=costs,
        )
        for mb, real in planned:
            lp, ent = forward_logprobs(
                model, mb, temperature=temperature, with_entropy=with_entropy
            )
            if not real:
                continue
            logprobs[mb.rows, : mb.width] = lp.float().cpu()
            if entropy is not None and ent is not None:
                entropy[mb.rows, : mb.width] = ent.float().cpu()
    finally:
        model.train(was_training)
        reshard(model)
    return all_reduce_sum(logprobs), None if entropy is None else all_reduce_sum(entropy)
