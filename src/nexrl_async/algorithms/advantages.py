"""Sequence-level advantage estimators over groups of samples of the same prompt.

A *group* is the set of samples generated for one prompt; ``group_ids[b]`` names the group of
sample ``b``. Rewards are one scalar per sample (outcome rewards). Statistics are computed in
float64 and the result is cast back to the rewards' dtype (float32 for integer rewards).

A group of one carries no baseline information: ``grpo``, ``dr_grpo`` and ``rloo`` give it
advantage 0 (and ``zero_variance_groups`` flags it).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

Estimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)

GroupIds = Tensor | Sequence[Hashable]


def _rewards64(rewards: Tensor) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B]; got shape {tuple(rewards.shape)}")
    r = rewards.detach().to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite")
    return r


def _group_index(group_ids: GroupIds, batch_size: int, device: torch.device) -> tuple[Tensor, int]:
    """Map ``group_ids`` to dense indices ``[B]`` in ``[0, G)``; return them and ``G``."""
    if isinstance(group_ids, Tensor):
        if group_ids.dim() != 1 or group_ids.is_floating_point() or group_ids.is_complex():
            raise ValueError("a group_ids tensor must be a 1-D integer tensor")
        uniques, index = torch.unique(group_ids, return_inverse=True)
        num_groups = uniques.numel()
    else:
        if isinstance(group_ids, str | bytes):
            raise ValueError("group_ids must be a tensor or a sequence of hashables, not a string")
        dense: dict[Hashable, int] = {}
        positions = [dense.setdefault(g, len(dense)) for g in group_ids]
        index = torch.tensor(positions, dtype=torch.long)
        num_groups = len(dense)
    if index.numel() != batch_size:
        raise ValueError(f"group_ids has {index.numel()} entries; rewards has {batch_size}")
    return index.to(device), num_groups


def _group_moments(r: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group size ``n``, mean and unbiased variance (0 for ``n = 1``), each ``[B]``."""
    count = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(
        0, index, torch.ones_like(r)
    )
    total = torch.zeros_like(count).index_add_(0, index, r)
    mean = (total / count)[index]
    squares = torch.zeros_like(count).index_add_(0, index, (r - mean) ** 2)
    variance = squares / (count - 1).clamp(min=1)
    return count[index], mean, variance[index]


def group_advantages(
    rewards: Tensor,
    group_ids: GroupIds,
    *,
    estimator: Estimator = "grpo",
    eps: float = 1e-6,
) -> Tensor:
    """Advantage of each sample from the rewards of its group (or of the batch).

    With ``g = group of b``, ``n_g`` its size, ``mean_g`` its mean reward and ``std_g`` its
    **unbiased** standard deviation (divisor ``n_g - 1``, as ``torch.std`` and the
    DeepSeekMath/TRL GRPO implementations use):

    - ``grpo`` (Shao et al. 2024, DeepSeekMath): ``A_b = (r_b - mean_g) / (std_g + eps)``;
    - ``dr_grpo`` (Liu et al. 2025, Dr. GRPO): ``A_b = r_b - mean_g`` (no std division);
    - ``rloo`` (Ahmadian et al. 2024): ``A_b = r_b - (sum_g r - r_b) / (n_g - 1)``, the
      leave-one-out baseline, equal to ``n_g / (n_g - 1) · (r_b - mean_g)``;
    - ``reinforce_pp`` (Hu 2025, REINFORCE++): the baseline-free global normalisation
      ``A_b = (r_b - mean_B) / (std_B + eps)`` over the whole batch (unbiased std); groups are
      ignored (but validated). This is the outcome-reward form of the paper's
      ``A = (R - mean_batch R) / std_batch R``; its token-level KL term is applied separately
      (``kl.placement``).

    A group of one gets ``A_b = 0`` for ``grpo``, ``dr_grpo`` and ``rloo`` (no baseline
    information). A group whose rewards are all equal gets exactly 0 from every estimator, as
    does a ``reinforce_pp`` batch whose rewards are all equal (a batch of one included).

    Args:
        rewards: ``[B]`` scalar reward per sample (finite).
        group_ids: ``[B]`` integer tensor, or a length-``B`` sequence of hashables.
        estimator: one of ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``.
        eps: added to the std before dividing (``grpo``, ``reinforce_pp``); ``>= 0``.

    Returns:
        ``[B]`` advantages, detached, with the rewards' dtype (float32 for integer rewards).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    r = _rewards64(rewards)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    index, num_groups = _group_index(group_ids, r.numel(), r.device)

    if estimator == "reinforce_pp":
        # One flat "group": the batch. Exactly 0 when all rewards are equal (or B < 2).
        index, num_groups = torch.zeros_like(index), 1
    count, mean, variance = _group_moments(r, index, num_groups)
    centred = r - mean
    if estimator in ("grpo", "reinforce_pp"):
        advantages = centred / (variance.sqrt() + eps)
    elif estimator == "dr_grpo":
        advantages = centred
    else:  # rloo
        advantages = centred * count / (count - 1).clamp(min=1)
    # Groups of one and zero-variance groups carry no signal: exactly 0 (also when eps = 0,
    # and whatever rounding the mean had).
    advantages = torch.where(_flat(r, index, num_groups), 0.0, advantages)
    return advantages.to(out_dtype)


def _flat(r: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """``[B]`` bool: the sample's group has ``max == min`` (a group of one included)."""
    high = torch.full((num_groups,), -torch.inf, dtype=r.dtype, device=r.device)
    high = high.scatter_reduce(0, index, r, "amax")
    low = torch.full_like(high, torch.inf).scatter_reduce(0, index, r, "amin")
    return (high == low)[index]


def zero_variance_groups(rewards: Tensor, group_ids: GroupIds) -> Tensor:
    """Flag samples whose group has zero reward variance (DAPO's dynamic-sampling filter).

    ``flag_b = (max_g r == min_g r)`` for ``g = group of b``, compared exactly (rewards are
    usually discrete). Such a group gives every group estimator zero advantage, so DAPO
    (Yu et al. 2025) drops it and samples more prompts. A group of one is flagged.

    Args:
        rewards: ``[B]`` scalar reward per sample (finite).
        group_ids: ``[B]`` integer tensor, or a length-``B`` sequence of hashables.

    Returns:
        ``[B]`` bool tensor, True where the sample's group has zero reward variance.
    """
    r = _rewards64(rewards)
    index, num_groups = _group_index(group_ids, r.numel(), r.device)
    return _flat(r, index, num_groups)
