"""The loss seam of per-token objectives (``algorithm.mode = "rl"`` and ``"sft"``).

A loss function receives one micro-batch's per-token tensors as :class:`TokenLossInputs` and
returns a 0-dim loss plus metrics; the trainer back-propagates the loss and sums it over the
micro-batches of an optimizer step. The built-in objectives are two such functions,
:func:`ppo_token_loss` (RL) and :func:`nll_token_loss` (SFT); ``algorithm.loss = "file.py:fn"``
replaces the mode's built-in with a user function of the same shape (docs/algorithms.md,
*Custom loss*)::

    def my_loss(inputs: TokenLossInputs) -> tuple[Tensor, dict[str, float]]: ...

Every tensor is ``[b, W]`` (the micro-batch's rows, trimmed to its longest) on the training
device. A loss must divide by ``inputs.denominator`` (the minibatch's global token or sequence
count, :func:`~nexrl_async.algorithms.aggregation.aggregation_denominator` summed over
micro-batches and ranks), not by its micro-batch's own count, so that the micro-batch losses
add up to the minibatch loss and world size 1 and N take the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from nexrl_async.algorithms.aggregation import AggMode, aggregate
from nexrl_async.algorithms.kl import kl_estimate
from nexrl_async.algorithms.policy import policy_loss
from nexrl_async.config.training import AlgorithmConfig

MetricValue = float | Tensor
"""A metric: a Python number or a 0-dim tensor (detached when read)."""


@dataclass(frozen=True, kw_only=True)
class TokenLossInputs:
    """One micro-batch's per-token tensors, ``[b, W]`` on the training device.

    Column ``t`` describes token ``t`` of each row; its log-prob comes from the logits at
    ``t - 1`` (column 0 and padding are never in ``loss_mask``).
    """

    logprobs: Tensor
    """Log-probs of the tokens under the policy being trained; differentiable. RL divides the
    logits by the sampling temperature first, SFT uses temperature 1."""
    loss_mask: Tensor
    """0/1: the tokens to train on."""
    denominator: Tensor
    """0-dim: the global count ``D`` of ``agg`` over the whole minibatch (all micro-batches and
    ranks). Divide by it, never by this micro-batch's own count."""
    agg: AggMode
    """``algorithm.loss_agg``."""
    norm_constant: float
    """``C`` of ``seq-mean-token-sum-norm`` (``rollout.max_new_tokens``)."""
    algorithm: AlgorithmConfig
    """The whole ``[algorithm]`` section (clip ranges, coefficients, ...)."""
    old_logprobs: Tensor | None = None
    """RL: the behaviour policy's log-probs (the PPO ratio's denominator), detached. SFT: None."""
    advantages: Tensor | None = None
    """RL: per-token advantages (KL-in-reward, ``prepare_batch`` and TIS applied). SFT: None."""
    ref_logprobs: Tensor | None = None
    """RL with ``kl.placement != "none"``: the reference model's log-probs. Else None."""
    entropy: Tensor | None = None
    """Per-token entropy, differentiable, when ``algorithm.entropy_coef > 0`` (RL). Else None."""
    kl_coef: float = 0.0
    """The KL controller's current coefficient ``beta`` (0 without a reference)."""

    def aggregate(self, values: Tensor) -> Tensor:
        """``aggregate(values, loss_mask, agg, denominator, norm_constant)``: reduce a per-token
        ``[b, W]`` quantity the way every built-in term is reduced."""
        return aggregate(
            values,
            self.loss_mask,
            self.agg,
            denominator=self.denominator,
            norm_constant=self.norm_constant,
        )


class LossOutput(NamedTuple):
    """What a loss function returns: a plain ``(loss, metrics)`` pair is one too.

    - ``loss``: 0-dim, differentiable; the micro-batch's share of the minibatch loss.
    - ``metrics``: values of this micro-batch, reported as ``train/<key>``: averaged over the
      micro-batches weighted by their loss tokens (keys ending in ``_max``: the maximum).
    - ``parts``: terms of the loss, already divided by the global denominator, so they add up
      over the micro-batches like the loss (reported as ``train/<key>``).
    """

    loss: Tensor
    metrics: Mapping[str, MetricValue] = {}
    parts: Mapping[str, MetricValue] = {}


TokenLossFn = Callable[[TokenLossInputs], LossOutput | tuple[Tensor, Mapping[str, MetricValue]]]
"""The seam's signature (a user function may return either shape)."""


def ppo_token_loss(inputs: TokenLossInputs) -> LossOutput:
    """The built-in RL loss of one micro-batch's ``[B, T]`` tensors: PPO-clip surrogate, optional
    KL-to-reference, entropy bonus.

    ``loss = agg(l_pg) + beta · agg(kl) [kl.placement = "loss"] - entropy_coef · agg(H)``, every
    term aggregated with the same mode and global denominator (docs/algorithms.md). Parts:
    ``pg_loss``, ``kl_loss``, ``entropy_bonus``; metrics: :func:`policy_loss` 's statistics.
    """
    algo = inputs.algorithm
    if inputs.old_logprobs is None or inputs.advantages is None:
        raise ValueError("the RL loss needs old_logprobs and advantages")
    pg, stats = policy_loss(
        inputs.logprobs,
        inputs.old_logprobs,
        inputs.advantages,
        inputs.loss_mask,
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        dual_clip_c=algo.dual_clip_c,
        agg=inputs.agg,
        denominator=inputs.denominator,
        norm_constant=inputs.norm_constant,
    )
    loss = pg
    parts: dict[str, MetricValue] = {"pg_loss": pg.detach()}
    if algo.kl.placement == "loss" and inputs.ref_logprobs is not None:
        kl_term = inputs.aggregate(kl_estimate(inputs.logprobs, inputs.ref_logprobs, algo.kl.kind))
        loss = loss + inputs.kl_coef * kl_term
        parts["kl_loss"] = kl_term.detach()
    if inputs.entropy is not None and algo.entropy_coef > 0:
        entropy_term = inputs.aggregate(inputs.entropy)
        loss = loss - algo.entropy_coef * entropy_term
        parts["entropy_bonus"] = entropy_term.detach()
    return LossOutput(loss, dict(stats), parts)


def nll_token_loss(inputs: TokenLossInputs) -> LossOutput:
    """The built-in SFT loss of one micro-batch's ``[B, T]`` tensors: ``agg(-log p)`` over the
    loss-masked tokens (metric ``nll``, the micro-batch's mean NLL per token)."""
    loss = inputs.aggregate(-inputs.logprobs)
    keep = inputs.loss_mask != 0
    tokens = float(keep.sum())
    nll = float(-(inputs.logprobs.detach() * keep).sum()) / tokens if tokens else 0.0
    return LossOutput(loss, {"nll": nll})


BUILTIN_TOKEN_LOSSES: dict[str, TokenLossFn] = {"rl": ppo_token_loss, "sft": nll_token_loss}
"""The built-in loss of each per-token mode."""
