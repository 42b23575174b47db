"""Token log-probs and entropies from logits ``[..., V]``, computed without a full log-softmax."""

from __future__ import annotations

import torch
from torch import Tensor

HALF_PRECISION_CHUNK_ROWS = 1024
"""Rows upcast to float32 at a time for bf16/fp16 logits (bounds the float32 copy)."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution given by ``logits`` over the last dim.

    ``H = logsumexp(x) - sum_v softmax(x)_v · x_v`` with ``x = logits``, which equals
    ``-sum_v p_v log p_v`` without taking the log of a softmax. bf16/fp16 logits are upcast to
    float32 (and so is the result). Logits must be finite.

    Args:
        logits: ``[..., V]`` (e.g. ``[B, T, V]``).

    Returns:
        ``[...]`` entropies (e.g. ``[B, T]``), differentiable.
    """
    x = logits.float() if logits.dtype in _LOW_PRECISION else logits
    probs = torch.softmax(x, dim=-1)
    return torch.logsumexp(x, dim=-1) - (probs * x).sum(dim=-1)


def _gather_logprobs(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    x = logits if temperature == 1.0 else logits / temperature
    picked = x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    ``logp[...] = x[..., labels[...]] - logsumexp_v x[..., v]`` with ``x = logits / temperature``:
    the gather happens before the normaliser, so no ``[..., V]`` log-softmax is materialised.
    float32/float64 logits are used as they are; bf16/fp16 logits are upcast to float32
    ``HALF_PRECISION_CHUNK_ROWS`` rows at a time, and the result is float32.

    Use the sampler's temperature so the trainer's log-probs match the rollout's.

    Args:
        logits: ``[..., V]`` (e.g. ``[B, T, V]``, already shifted to predict ``labels``).
        labels: ``[...]`` integer token ids in ``[0, V)`` (e.g. ``[B, T]``).
        temperature: ``> 0``.

    Returns:
        ``[...]`` log-probs (e.g. ``[B, T]``), differentiable w.r.t. ``logits``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must be logits.shape[:-1]; got {tuple(labels.shape)} for logits "
            f"{tuple(logits.shape)}"
        )
    labels = labels.long()
    if logits.dtype not in _LOW_PRECISION:
        return _gather_logprobs(logits, labels, temperature)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    chunks = [
        _gather_logprobs(rows.float(), row_labels, temperature)
        for rows, row_labels in zip(
            flat_logits.split(HALF_PRECISION_CHUNK_ROWS),
            flat_labels.split(HALF_PRECISION_CHUNK_ROWS),
            strict=True,
        )
    ]
    if not chunks:
        return torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    return torch.cat(chunks).reshape(labels.shape)
