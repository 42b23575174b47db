"""Pure torch functions of the RL math: advantages, policy losses, KL, entropy, SFT and DPO.

Owns: ``nexrl_async.algorithms`` (advantage estimators, aggregation, losses, KL controllers,
importance corrections, the loss seam's input and output types and its built-in losses). Each
function documents its formula and tensor shapes.
Must not import: ``inference``, ``pipeline``, ``rollout``, ``train``, ``weights``, ``engine``.
"""

from __future__ import annotations

from nexrl_async.algorithms.advantages import group_advantages, zero_variance_groups
from nexrl_async.algorithms.aggregation import aggregate, aggregation_denominator
from nexrl_async.algorithms.correction import tis_weights
from nexrl_async.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate
from nexrl_async.algorithms.logits import entropy_from_logits, logprobs_from_logits
from nexrl_async.algorithms.policy import policy_loss
from nexrl_async.algorithms.preference import PairLossInputs, builtin_pair_loss, dpo_loss
from nexrl_async.algorithms.sft import sft_loss
from nexrl_async.algorithms.shaping import overlong_penalty
from nexrl_async.algorithms.token_loss import (
    LossOutput,
    TokenLossInputs,
    nll_token_loss,
    ppo_token_loss,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "LossOutput",
    "PairLossInputs",
    "TokenLossInputs",
    "aggregate",
    "aggregation_denominator",
    "builtin_pair_loss",
    "dpo_loss",
    "entropy_from_logits",
    "group_advantages",
    "kl_estimate",
    "logprobs_from_logits",
    "nll_token_loss",
    "overlong_penalty",
    "policy_loss",
    "ppo_token_loss",
    "sft_loss",
    "tis_weights",
    "zero_variance_groups",
]
