"""Supervised fine-tuning loss: masked negative log-likelihood."""

from __future__ import annotations

from torch import Tensor

from nexrl_async.algorithms.aggregation import AggMode, aggregate


def sft_loss(
    logprobs: Tensor,
    mask: Tensor,
    *,
    agg: AggMode = "token-mean",
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Negative log-likelihood of the target tokens: ``aggregate(-logprobs, mask, agg)``.

    With the default ``token-mean``: ``loss = -sum_{b,t} m·logp / D``, ``D = sum(m)`` (or the
    global token count given as ``denominator``). ``seq-mean-token-sum-norm`` uses its default
    ``C = T`` (``mask.shape[-1]``).

    Args:
        logprobs: ``[B, T]`` log-probs of the target tokens.
        mask: ``[B, T]`` 0/1 mask of the tokens to learn.
        agg: aggregation mode (see :func:`aggregate`).
        denominator: global count for ``agg`` (see :func:`aggregation_denominator`).

    Returns:
        A 0-dim loss.
    """
    return aggregate(-logprobs, mask, agg, denominator=denominator)
