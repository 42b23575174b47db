"""Importance weights that correct for the trainer/inference-engine log-prob mismatch.

The rollout engine samples with its own numerics (kernels, precision, possibly stale weights),
so ``pi_rollout`` differs slightly from the trainer's ``pi_old``. Truncated importance sampling
(TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training") reweights each token's loss by ``pi_old / pi_rollout``, truncated at ``cap``;
masked importance sampling (MIS) drops tokens or sequences whose weight exceeds ``cap``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

TISLevel = Literal["token", "sequence"]
TISMode = Literal["truncate", "mask"]
TIS_LEVELS: tuple[str, ...] = get_args(TISLevel)
TIS_MODES: tuple[str, ...] = get_args(TISMode)

LOG_WEIGHT_CLAMP = 20.0


def tis_weights(
    trainer_old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    *,
    cap: float,
    level: TISLevel = "token",
    mode: TISMode = "truncate",
) -> Tensor:
    """Detached importance weights ``[B, T]`` of the trainer's old policy over the rollout's.

    With ``d[b, t] = trainer_old_logprobs - rollout_logprobs`` and ``m`` the 0/1 mask:

    - ``level="token"``:    ``log w[b, t] = d[b, t]``;
    - ``level="sequence"``: ``log w[b, t] = sum_t' m[b, t'] · d[b, t']`` for every ``t`` (the
      sequence's likelihood ratio, broadcast over its tokens);

    ``log w`` is clamped to ``[-20, 20]`` before ``exp``. Then

    - ``mode="truncate"`` (TIS): ``w = min(w, cap)``;
    - ``mode="mask"`` (MIS):     ``w = w if w <= cap else 0``.

    Masked positions get 0. The weights multiply the per-token policy loss before aggregation;
    since ``w >= 0``, ``w · l(A) = l(w · A)`` for the PPO token loss ``l`` (dual-clip included),
    so pass ``policy_loss(..., advantages=A[:, None] * w)`` to apply them.

    Args:
        trainer_old_logprobs: ``[B, T]`` log-probs of the sampled tokens under the trainer's
            weights of the sampling version.
        rollout_logprobs: ``[B, T]`` log-probs reported by the inference engine.
        mask: ``[B, T]`` 0/1 mask.
        cap: truncation / rejection threshold ``C > 0``.
        level: ``token`` or ``sequence``.
        mode: ``truncate`` or ``mask``.

    Returns:
        ``[B, T]`` weights, detached, with ``trainer_old_logprobs``' dtype.
    """
    if level not in TIS_LEVELS:
        raise ValueError(f"unknown TIS level {level!r}; expected one of {TIS_LEVELS}")
    if mode not in TIS_MODES:
        raise ValueError(f"unknown TIS mode {mode!r}; expected one of {TIS_MODES}")
    if not cap > 0:
        raise ValueError(f"cap must be > 0; got {cap}")
    if trainer_old_logprobs.shape != rollout_logprobs.shape or mask.shape != rollout_logprobs.shape:
        raise ValueError(
            "trainer_old_logprobs, rollout_logprobs and mask must share [B, T]; got "
            f"{tuple(trainer_old_logprobs.shape)}, {tuple(rollout_logprobs.shape)}, "
            f"{tuple(mask.shape)}"
        )
    with torch.no_grad():
        keep = mask != 0
        diff = trainer_old_logprobs.detach() - rollout_logprobs.detach()
        diff = torch.where(keep, diff, torch.zeros_like(diff))
        if level == "sequence":
            diff = diff.sum(dim=-1, keepdim=True).expand_as(diff)
        weights = torch.exp(diff.clamp(-LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP))
        if mode == "truncate":
            weights = weights.clamp(max=cap)
        else:
            weights = torch.where(weights <= cap, weights, torch.zeros_like(weights))
        return torch.where(keep, weights, torch.zeros_like(weights))
