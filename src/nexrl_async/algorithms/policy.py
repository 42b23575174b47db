"""PPO clipped surrogate policy loss, with clip-higher and dual-clip."""

from __future__ import annotations

import torch
from torch import Tensor

from nexrl_async.algorithms.aggregation import AggMode, aggregate

LOG_RATIO_CLAMP = 20.0
"""``|log ratio|`` is clamped to this before ``exp`` so one wild token cannot overflow."""


def _masked_mean(x: Tensor, keep: Tensor) -> Tensor:
    total = torch.where(keep, x, torch.zeros_like(x)).sum()
    return total / keep.sum().clamp(min=1).to(x.dtype)


def _broadcast_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    a = advantages.detach()
    if a.dim() == 1 and a.shape[0] == shape[0]:
        return a.unsqueeze(-1).expand(shape)
    if a.shape == shape:
        return a
    raise ValueError(
        f"advantages must be [B] or [B, T] for [B, T] = {tuple(shape)}; got {tuple(a.shape)}"
    )


def _check_clips(clip_low: float, clip_high: float, dual_clip_c: float | None) -> None:
    if not 0 <= clip_low <= 1:
        raise ValueError(f"clip_low must be in [0, 1]; got {clip_low}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0; got {clip_high}")
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1; got {dual_clip_c}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
    agg: AggMode = "token-mean",
    denominator: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017) with asymmetric clip and dual-clip.

    Per token, with ``rho = exp(clamp(logprobs - old_logprobs, -20, 20))``::

        l = max(-A·rho, -A·clip(rho, 1 - clip_low, 1 + clip_high))
        l = min(l, -A·c)   where A < 0, if dual_clip_c = c is set (Ye et al. 2020)

    then ``loss = aggregate(l, mask, agg, denominator=..., norm_constant=...)``. Setting
    ``clip_high > clip_low`` is DAPO's clip-higher. ``advantages`` and ``old_logprobs`` are
    treated as constants (detached); gradients flow through ``logprobs`` only. At step 0
    (``logprobs == old_logprobs``) the token-mean gradient is ``-A·m / D``.

    Stats (detached masked token means over this call's tokens; 0 when the mask is empty):

    - ``clip_frac_high``: ``A > 0`` and ``rho > 1 + clip_high`` (upper clip active, no gradient);
    - ``clip_frac_low``: ``A < 0`` and ``rho < 1 - clip_low`` (lower clip active, no gradient);
    - ``approx_kl``: k3 estimate of ``KL(pi_old || pi)``, ``rho - 1 - log rho`` (>= 0);
    - ``ratio_mean``, ``ratio_max``: mean and max of ``rho`` over masked tokens;
    - ``dual_clip_frac`` (only with ``dual_clip_c``): ``A < 0`` and the bound ``-A·c`` active.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy.
        old_logprobs: ``[B, T]`` log-probs under the behaviour policy (server or recomputed).
        advantages: ``[B]`` (broadcast over ``T``) or ``[B, T]``.
        mask: ``[B, T]`` 0/1 loss mask.
        clip_low: ``epsilon_low`` in ``[0, 1]``.
        clip_high: ``epsilon_high`` ``>= 0``.
        dual_clip_c: dual-clip constant ``c > 1``, or None to disable.
        agg: aggregation mode (see :func:`aggregate`).
        denominator: global count for ``agg`` (see :func:`aggregation_denominator`).
        norm_constant: ``C`` for ``seq-mean-token-sum-norm``.

    Returns:
        ``(loss, stats)``: a 0-dim loss and a dict of 0-dim detached tensors.
    """
    _check_clips(clip_low, clip_high, dual_clip_c)
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs, old_logprobs and mask must share [B, T]; got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    adv = _broadcast_advantages(advantages, logprobs.shape)
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # ``where`` rather than ``maximum``: on ties (rho inside the range) the whole gradient goes
    # through the unclipped term instead of being split in halves.
    per_token = torch.where(clipped > unclipped, clipped, unclipped)
    dual_active = None
    if dual_clip_c is not None:
        bound = -adv * dual_clip_c
        dual_active = (adv < 0) & (per_token > bound)
        per_token = torch.where(dual_active, bound, per_token)

    loss = aggregate(per_token, mask, agg, denominator=denominator, norm_constant=norm_constant)
    stats = _policy_stats(ratio.detach(), log_ratio.detach(), adv, mask != 0, clip_low, clip_high)
    if dual_active is not None:
        stats["dual_clip_frac"] = _masked_mean(dual_active.to(ratio.dtype), mask != 0)
    return loss, stats


def _policy_stats(
    ratio: Tensor, log_ratio: Tensor, adv: Tensor, keep: Tensor, clip_low: float, clip_high: float
) -> dict[str, Tensor]:
    high = ((adv > 0) & (ratio > 1.0 + clip_high)).to(ratio.dtype)
    low = ((adv < 0) & (ratio < 1.0 - clip_low)).to(ratio.dtype)
    # rho > 0, so zeroing unmasked entries leaves the masked max (and gives 0 for an empty mask).
    masked_ratio = torch.where(keep, ratio, torch.zeros_like(ratio))
    ratio_max = masked_ratio.max() if ratio.numel() > 0 else ratio.new_zeros(())
    return {
        "clip_frac_high": _masked_mean(high, keep),
        "clip_frac_low": _masked_mean(low, keep),
        "approx_kl": _masked_mean(ratio - 1.0 - log_ratio, keep),
        "ratio_mean": _masked_mean(ratio, keep),
        "ratio_max": ratio_max,
    }
