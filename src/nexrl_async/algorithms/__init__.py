"""Pure torch functions of the RL math: advantages, policy losses, KL, entropy, SFT loss.

Owns: ``nexrl_async.algorithms`` (advantage estimators, aggregation, losses, KL controllers,
importance corrections). Each function documents its formula and tensor shapes.
Must not import: ``inference``, ``pipeline``, ``rollout``, ``train``, ``weights``, ``engine``.
"""

from __future__ import annotations

from nexrl_async.algorithms.advantages import group_advantages, zero_variance_groups
from nexrl_async.algorithms.aggregation import aggregate, aggregation_denominator
from nexrl_async.algorithms.correction import tis_weights
from nexrl_async.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate
from nexrl_async.algorithms.logits import entropy_from_logits, logprobs_from_logits
from nexrl_async.algorithms.policy import policy_loss
from nexrl_async.algorithms.sft import sft_loss
from nexrl_async.algorithms.shaping import overlong_penalty

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "aggregation_denominator",
    "entropy_from_logits",
    "group_advantages",
    "kl_estimate",
    "logprobs_from_logits",
    "overlong_penalty",
    "policy_loss",
    "sft_loss",
    "tis_weights",
    "zero_variance_groups",
]
