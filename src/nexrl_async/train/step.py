"""Optimizer steps of one training step: minibatches × epochs, each with gradient accumulation.

For each epoch, the batch's rows are split into ``minibatches`` contiguous chunks (in batch
order). Each chunk is one optimizer step: its global loss denominator ``D`` is counted first
(and summed over ranks), then every micro-batch's loss — already divided by ``D`` — is
back-propagated, so the accumulated gradient equals the gradient of the whole chunk's loss.
Gradients are clipped by global norm (the pre-clip norm is reported); a step whose norm is not
finite is skipped (counted in ``train/skipped_steps``), never applied.
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
from nexrl_async.train.collectives import all_reduce_sum
from nexrl_async.train.logprobs import model_device
from nexrl_async.train.loss import MicroLoss, MicroResult
from nexrl_async.train.microbatch import micro_batches, split_minibatches
from nexrl_async.train.tensors import SequenceBatch


@dataclass(frozen=True)
class UpdateSettings:
    """How one training step turns into optimizer steps."""

    epochs: int
    minibatches: int
    token_budget: int
    max_grad_norm: float | None


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

    def add_micro(self, result: MicroResult) -> None:
        self.sums["loss"] = self.sums.get("loss", 0.0) + float(result.loss.detach())
        for key, value in result.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        for key, value in result.means.items():
            if key.endswith("_max"):
                self.maxima[key] = max(self.maxima.get(key, -math.inf), value)
            else:
                self.weighted[key] = self.weighted.get(key, 0.0) + value * result.tokens
        self.tokens += result.tokens

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
) -> torch.Tensor:
    """Back-propagate the loss of ``rows`` micro-batch by micro-batch; returns the total loss.

    Gradients are added to ``.grad`` (call ``zero_grad`` first). The returned 0-dim tensor is
    the detached sum of the micro-batch losses, i.e. the loss of ``rows`` as one batch.
    """
    device = model_device(model)
    index = torch.tensor(list(rows), dtype=torch.int64)
    local = aggregation_denominator(loss_fn.loss_mask[index], loss_fn.agg)
    denominator = all_reduce_sum(local).to(device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for mb in micro_batches(seq, rows, token_budget=token_budget, device=device):
        result = loss_fn(model, mb, denominator)
        result.loss.backward()
        total = total + result.loss.detach().float()
        if tally is not None:
            tally.add_micro(result)
    return total


def run_updates(
    model: PreTrainedModel,
    optimizer: Optimizer,
    seq: SequenceBatch,
    loss_fn: MicroLoss,
    settings: UpdateSettings,
) -> dict[str, float]:
    """All optimizer steps of one training step; returns the merged ``train/...`` metrics."""
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
    tally = Tally()
    model.train()
    try:
        for _ in range(settings.epochs):
            for rows in split_minibatches(seq.size, settings.minibatches):
                optimizer.zero_grad(set_to_none=True)
                accumulate_gradients(
                    model, seq, rows, loss_fn, token_budget=settings.token_budget, tally=tally
                )
                norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                tally.grad_norms.append(norm)
                if math.isfinite(norm):
                    optimizer.step()
                else:
                    tally.skipped += 1
                    logger.warning("non-finite gradient norm ({}): optimizer step skipped", norm)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return tally.metrics()
