"""Per-token log-probs (and entropies) of a micro-batch, aligned to its tokens.

The model's logits at position ``t - 1`` predict token ``t``; the result is shifted back so that
column ``t`` holds ``log p(x_t | x_<t)`` (column 0, which nothing predicts, and padding hold 0).
Logits are divided by the sampling temperature, as the inference server does before its
log-softmax (docs/sglang_api.md §2.5), so trainer and server log-probs compare one to one.

A packed micro-batch runs the padding-free forward (:mod:`~nexrl_async.train.packing`): the
same shift is applied along the concatenated sequence, and the result is gathered back to the
``[b, W]`` layout, so a row never takes a log-prob from another row's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from nexrl_async.algorithms import entropy_from_logits, logprobs_from_logits
from nexrl_async.train.microbatch import MicroBatch, micro_batches
from nexrl_async.train.packing import packed_logits, unpack
from nexrl_async.train.packing_plan import PlanCosts
from nexrl_async.train.prefix_sharing import shared_prefix_logits, shares_prefixes
from nexrl_async.train.tensors import SequenceBatch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def forward_logprobs(
    model: PreTrainedModel,
    mb: MicroBatch,
    *,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[b, W]`` of the micro-batch's tokens and, if asked, entropies ``[b, W]``.

    ``entropy[:, t]`` is the entropy of the (temperature-scaled) distribution that token ``t``
    was drawn from. Both are differentiable when grad mode is on (the entropy only with
    ``entropy_grad``; without it the entropy is computed under no-grad, e.g. for a metric);
    float32 for half-precision models. Packed micro-batches run padding-free; the result is the
    same.
    """
    if mb.packed is not None:
        logits = packed_logits(model, mb.packed)
        logprobs, entropy = _shifted(
            logits, mb.packed.input_ids, temperature, with_entropy, entropy_grad
        )
        return unpack(logprobs, mb.packed), None if entropy is None else unpack(entropy, mb.packed)
    if mb.shared is not None:
        logits = shared_prefix_logits(model, mb.shared, mb.width)
    else:
        out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        logits = out.logits
    logprobs, entropy = _shifted(logits, mb.input_ids, temperature, with_entropy, entropy_grad)
    real = mb.attention_mask != 0
    logprobs = torch.where(real, logprobs, 0.0)
    return logprobs, None if entropy is None else torch.where(real, entropy, 0.0)


def _shifted(
    logits: Tensor,
    input_ids: Tensor,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Column ``t`` from the logits at ``t - 1``: ``[n, L]`` log-probs (entropies), column 0 = 0."""
    logits = logits[:, :-1, :]
    logprobs = F.pad(
        logprobs_from_logits(logits, input_ids[:, 1:], temperature=temperature), (1, 0)
    )
    if not with_entropy:
        return logprobs, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        scaled = logits if temperature == 1.0 else logits / temperature
        return logprobs, F.pad(entropy_from_logits(scaled), (1, 0))


@torch.no_grad()
def batch_logprobs(
    model: PreTrainedModel,
    seq: SequenceBatch,
    *,
    token_budget: int,
    temperature: float,
    with_entropy: bool = False,
    packing: bool = True,
    costs: PlanCosts | None = None,
    share_prefix: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[B, T]`` (and entropies) of every row, in eval mode, without gradients.

    Runs micro-batch by micro-batch on the model's device: packed unless ``packing=False`` or
    ``costs`` (:func:`~nexrl_async.train.packing.plan_costs` of the model) find the padded
    plan cheaper. The results are float32 on CPU.
    """
    device = model_device(model)
    logprobs = torch.zeros(seq.input_ids.shape, dtype=torch.float32)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    was_training = model.training
    model.eval()
    try:
        planned = micro_batches(
            seq,
            range(seq.size),
            token_budget=token_budget,
            device=device,
            packing=packing,
            costs=costs,
            share_prefix=share_prefix and shares_prefixes(model),
        )
        for mb in planned:
            lp, ent = forward_logprobs(
                model, mb, temperature=temperature, with_entropy=with_entropy
            )
            logprobs[mb.rows, : mb.width] = lp.float().cpu()
            if entropy is not None and ent is not None:
                entropy[mb.rows, : mb.width] = ent.float().cpu()
    finally:
        model.train(was_training)
    return logprobs, entropy
