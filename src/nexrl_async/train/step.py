"""Optimizer steps of one training step: minibatches × epochs, each with gradient accumulation.

For each epoch, the batch's rows are split into ``minibatches`` contiguous chunks (in batch
order). Each chunk is one optimizer step: its global loss denominator ``D`` is counted first
(and summed over ranks), then every micro-batch's loss — already divided by ``D`` — is
back-propagated, so the accumulated gradient equals the gradient of the whole chunk's loss.
Gradients are clipped by global norm (the pre-clip norm is reported); a step whose norm is not
finite is skipped (counted in ``train/skipped_steps``), never applied.

At world size ``N > 1`` every rank holds the whole batch but trains only its share of each
minibatch (:func:`~nexrl_async.train.ranks.lockstep.rank_rows`), padding its micro-batches to the
ranks' common count (:mod:`~nexrl_async.train.ranks.lockstep`). The denominator ``D`` is the global
count, FSDP2 sums the gradients over ranks, and the norm is taken over the sharded gradients, so
the optimizer step is the one world size 1 takes on the same batch. The metrics' sums, weighted
means and maxima are reduced over ranks, so every rank reports the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch.optim import Optimizer
from transformers import PreTrainedModel

from nexrl_async.algorithms import aggregation_denominator
from nexrl_async.train.logprobs import model_device
from nexrl_async.train.loss import MicroLoss, MicroResult
from nexrl_async.train.microbatch import split_minibatches
from nexrl_async.train.packing import plan_costs
from nexrl_async.train.prefix_sharing import shares_prefixes
from nexrl_async.train.ranks.collectives import all_reduce_max, all_reduce_sum
from nexrl_async.train.ranks.lockstep import lockstep_micro_batches, rank_rows
from nexrl_async.train.ranks.sharding import norm_value
from nexrl_async.train.tensors import SequenceBatch


@dataclass(frozen=True)
class UpdateSettings:
    """How one training step turns into optimizer steps."""

    epochs: int
    minibatches: int
    token_budget: int
    max_grad_norm: float | None
    packing: bool = True
    """Padding-free micro-batches where they pay (``trainer.packing``; see
    :func:`~nexrl_async.train.packing.plan_costs`)."""
    share_prefix: bool = False
    """Compute a prompt that rows of a padded micro-batch share once (``trainer.share_prefix``;
    world size 1)."""
    rank: int = 0
    world_size: int = 1


@dataclass
class Tally:
    """Statistics merged over micro-batches and optimizer steps into ``train/...`` metrics.

    ``sums`` of one optimizer step are added over its micro-batches, then averaged over
    optimizer steps (``loss`` and its parts); ``means`` are weighted by loss tokens over every
    micro-batch (keys ending in ``_max`` take the maximum instead).
    """

    sums: dict[str, float] = field(default_factory=dict)
    weighted: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0

    def add_micro(self, result: MicroResult, *, real: bool = True) -> None:
        """Merge one micro-batch; a lockstep filler (``real=False``) only registers its keys,
        so every rank reduces the same keys."""
        if not real:
            self._register(result)
            return
        self.sums["loss"] = self.sums.get("loss", 0.0) + float(result.loss.detach())
        for key, value in result.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        for key, value in result.means.items():
            if key.endswith("_max"):
                self.maxima[key] = max(self.maxima.get(key, -math.inf), value)
            else:
                self.weighted[key] = self.weighted.get(key, 0.0) + value * result.tokens
        self.tokens += result.tokens

    def _register(self, result: MicroResult) -> None:
        for key in ("loss", *result.sums):
            self.sums.setdefault(key, 0.0)
        for key in result.means:
            if key.endswith("_max"):
                self.maxima.setdefault(key, -math.inf)
            else:
                self.weighted.setdefault(key, 0.0)

    def reduce(self) -> None:
        """Sum ``sums``, ``weighted`` and ``tokens`` and take the max of ``maxima`` over ranks.

        Every rank must call it with the same keys (fillers register theirs); a no-op at world
        size 1.
        """
        summed = sorted(self.sums), sorted(self.weighted)
        values = [self.sums[k] for k in summed[0]] + [self.weighted[k] for k in summed[1]]
        total = all_reduce_sum(torch.tensor([*values, self.tokens], dtype=torch.float64))
        for i, key in enumerate(summed[0]):
            self.sums[key] = float(total[i])
        for i, key in enumerate(summed[1]):
            self.weighted[key] = float(total[len(summed[0]) + i])
        self.tokens = float(total[-1])
        if self.maxima:
            keys = sorted(self.maxima)
            top = all_reduce_max(torch.tensor([self.maxima[k] for k in keys], dtype=torch.float64))
            self.maxima = {k: float(v) for k, v in zip(keys, top.tolist(), strict=True)}

    def metrics(self) -> dict[str, float]:
        steps = max(len(self.grad_norms), 1)
        out = {f"train/{k}": v / steps for k, v in self.sums.items()}
        out.update(
            {
                f"train/{k}": v / self.tokens if self.tokens else 0.0
                for k, v in self.weighted.items()
            }
        )
        out.update({f"train/{k}": v for k, v in self.maxima.items()})
        finite = [n for n in self.grad_norms if math.isfinite(n)]
        out["train/grad_norm"] = sum(finite) / len(finite) if finite else math.nan
        out["train/optimizer_steps"] = float(len(self.grad_norms) - self.skipped)
        out["train/skipped_steps"] = float(self.skipped)
        return out


def accumulate_gradients(
    model: PreTrainedModel,
    seq: SequenceBatch,
    rows: Sequence[int],
    loss_fn: MicroLoss,
    *,
    token_budget: int,
    tally: Tally | None = None,
    packing: bool = True,
    world_size: int = 1,
    share_prefix: bool = False,
) -> torch.Tensor:
    """Back-propagate the loss of ``rows`` micro-batch by micro-batch; returns the total loss.

    ``rows`` are this rank's rows; the denominator is summed over ranks, and at world size > 1
    the micro-batches run in lockstep with the other ranks (fillers contribute nothing).
    ``packing`` packs where it pays for ``model`` (:func:`~nexrl_async.train.packing.plan_costs`).
    Gradients are added to ``.grad`` (call ``zero_grad`` first). The returned 0-dim tensor is
    the detached sum of this rank's micro-batch losses (at world size 1: the loss of ``rows``).
    """
    device = model_device(model)
    index = torch.tensor(list(rows), dtype=torch.int64)
    local = aggregation_denominator(loss_fn.loss_mask[index], loss_fn.agg)
    denominator = all_reduce_sum(local).to(device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    planned = lockstep_micro_batches(
        seq,
        rows,
        token_budget=token_budget,
        device=device,
        packing=packing,
        world_size=world_size,
        costs=plan_costs(model) if packing else None,
        share_prefix=share_prefix and world_size == 1 and shares_prefixes(model),
    )
    for mb, real in planned:
        result = loss_fn(model, mb, denominator)
        if not real:
            (result.loss * 0.0).backward()
        else:
            result.loss.backward()
            total = total + result.loss.detach().float()
        if tally is not None:
            tally.add_micro(result, real=real)
    return total


def run_updates(
    model: PreTrainedModel,
    optimizer: Optimizer,
    seq: SequenceBatch,
    loss_fn: MicroLoss,
    settings: UpdateSettings,
) -> dict[str, float]:
    """All optimizer steps of one training step; returns the merged ``train/...`` metrics."""
    # the optimizer's parameters: an FSDP2 root left unsharded by a no-grad forward exposes its
    # unsharded tensors through model.parameters() until its next backward
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
    tally = Tally()
    model.train()
    try:
        for _ in range(settings.epochs):
            for rows in split_minibatches(seq.size, settings.minibatches):
                optimizer.zero_grad(set_to_none=True)
                accumulate_gradients(
                    model,
                    seq,
                    rank_rows(seq.lengths, rows, settings.rank, settings.world_size),
                    loss_fn,
                    token_budget=settings.token_budget,
                    tally=tally,
                    packing=settings.packing,
                    world_size=settings.world_size,
                    share_prefix=settings.share_prefix,
                )
                norm = norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
                tally.grad_norms.append(norm)
                if math.isfinite(norm):
                    optimizer.step()
                else:
                    tally.skipped += 1
                    logger.warning("non-finite gradient norm ({}): optimizer step skipped", norm)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    if settings.world_size > 1:
        tally.reduce()
    return tally.metrics()
