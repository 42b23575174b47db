"""Validation loss: the policy's NLL of a batch's loss-masked tokens, without training.

For ``algorithm.mode = "sft"`` validation measures how well the model predicts held-out
reference completions, not a reward. With ``m`` the loss mask and ``log p`` the trainer's
per-token log-probs at temperature 1 (as :class:`~nexrl_async.train.loss.SFTLoss` trains them)::

    val/loss   = -Σ m · log p / Σ m        mean NLL per loss-masked token (nats)
    val/ppl    = exp(val/loss)
    val/tokens = Σ m

The mean is per token whatever ``algorithm.loss_agg`` is, so the number does not depend on how
the validation set is batched. FAILED trajectories are skipped (the caller counts them); a batch
with no loss tokens gives ``nan`` loss and perplexity and 0 tokens.

```
batch = TrainBatch(step=step, groups=val_groups)          # e.g. from the SFT worker
metrics = trainer.validation_loss(batch)                  # Trainer.validation_loss calls this
```

Blocking torch code: call it from a worker thread, through the same limiter as the train step,
since a trainer serves one call at a time.
"""

from __future__ import annotations

import math

import msgspec
import torch
from transformers import PreTrainedModel

from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import Group, TrainBatch
from nexrl_async.train.logprobs import batch_logprobs
from nexrl_async.train.packing import plan_costs
from nexrl_async.train.tensors import sequences_from_batch

SFT_TEMPERATURE = 1.0
"""The NLL is the model's own distribution's, as the SFT loss trains it."""


def validation_loss(
    model: PreTrainedModel, batch: TrainBatch, *, pad_token_id: int, token_budget: int
) -> dict[str, float]:
    """``val/loss``, ``val/ppl`` and ``val/tokens`` of ``batch`` (see the module docstring).

    Runs ``model`` in eval mode without gradients, micro-batch by micro-batch within
    ``token_budget`` tokens; the model's mode and weights are left as they were.

    Raises:
        TrainError: a torch failure (a token id outside the vocabulary, out of memory).
    """
    kept = _scorable(batch)
    if not kept.groups:
        return _metrics(math.nan, 0)
    try:
        seq = sequences_from_batch(kept, pad_token_id=pad_token_id)
        logprobs, _ = batch_logprobs(
            model,
            seq,
            token_budget=token_budget,
            temperature=SFT_TEMPERATURE,
            costs=plan_costs(model),
        )
    except (RuntimeError, ValueError, IndexError) as err:
        raise TrainError(f"validation loss: {type(err).__name__}: {err}") from err
    mask = seq.loss_mask != 0
    tokens = int(mask.sum())
    if tokens == 0:
        return _metrics(math.nan, 0)
    nll = -float(torch.where(mask, logprobs, 0.0).double().sum()) / tokens
    return _metrics(nll, tokens)


def _scorable(batch: TrainBatch) -> TrainBatch:
    """``batch`` without FAILED or token-less trajectories (and groups left empty)."""
    groups: list[Group] = []
    for group in batch.groups:
        trajs = [t for t in group.trajectories if t.ok and t.num_tokens > 0]
        if trajs:
            groups.append(msgspec.structs.replace(group, trajectories=trajs))
    return msgspec.structs.replace(batch, groups=groups)


def _metrics(nll: float, tokens: int) -> dict[str, float]:
    ppl = math.inf if nll > 700.0 else math.exp(nll)  # exp overflows past ~709; nan stays nan
    return {"val/loss": nll, "val/ppl": ppl, "val/tokens": float(tokens)}
