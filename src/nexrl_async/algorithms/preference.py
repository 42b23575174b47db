"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO and length-normalised forms.

A preference pair is a prompt with a *chosen* and a *rejected* completion. With ``s`` the
sum of a completion's token log-probs under the policy, ``s_ref`` under the frozen reference,
and ``n`` its token count::

    u_c = s_c - s_ref_c,  u_r = s_r - s_ref_r      (or u / n with length_norm)
    h   = u_c - u_r
    sigmoid:  l = -(1 - eps) · log σ(beta · h) - eps · log σ(-beta · h)    (eps: label smoothing)
    ipo:      l = (h - 1 / (2 · beta))²                                     (Azar et al. 2023)
    loss = mean over pairs of l

At the start of training the policy is the reference, so ``h = 0`` and the sigmoid loss is
``-log σ(0) = ln 2`` whatever beta and eps are. The implicit rewards are ``beta · u_c`` and
``beta · u_r``; a pair is ranked right when the chosen one's is strictly larger (a tie, as at
step 0, counts as wrong).

The loss is a function of the ``[P]`` sequence log-probs only, so it is written for any
callable of :class:`PairLossInputs` (the ``algorithm.loss`` seam of ``mode = "dpo"``); the
trainer turns its gradient w.r.t. the sequence log-probs into per-token weights (see
``train/dpo.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from nexrl_async.algorithms.token_loss import LossOutput, MetricValue
from nexrl_async.config.training import DPOConfig

PairLoss = Literal["sigmoid", "ipo"]
PAIR_LOSSES: tuple[str, ...] = get_args(PairLoss)


@dataclass(frozen=True, kw_only=True)
class PairLossInputs:
    """The sequence log-probs of ``P`` preference pairs, ``[P]`` float64.

    ``chosen_logps`` and ``rejected_logps`` are differentiable (the trainer asks for the
    gradient w.r.t. them); the reference's and the token counts are constants.
    """

    chosen_logps: Tensor
    """``s_c``: sum of the chosen completion's token log-probs under the policy."""
    rejected_logps: Tensor
    """``s_r``: the same for the rejected completion."""
    ref_chosen_logps: Tensor
    """``s_ref_c``: under the reference model (or precomputed in the data)."""
    ref_rejected_logps: Tensor
    """``s_ref_r``."""
    chosen_tokens: Tensor
    """``n_c``: trained tokens of the chosen completion (>= 1)."""
    rejected_tokens: Tensor
    """``n_r``."""
    config: DPOConfig
    """``[algorithm.dpo]``: beta, the loss kind, label smoothing, length normalisation."""


PairLossFn = Callable[[PairLossInputs], LossOutput | tuple[Tensor, Mapping[str, MetricValue]]]
"""The seam's signature in ``mode = "dpo"``: the mean loss over the pairs plus metrics."""


def _check(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"pair tensors must be [P] with P >= 1; got {tuple(shape)}")
    for t in tensors:
        if t.shape != shape:
            raise ValueError(f"pair tensors must share [P] = {tuple(shape)}; got {tuple(t.shape)}")


def implicit_rewards(inputs: PairLossInputs) -> tuple[Tensor, Tensor]:
    """``(beta · u_c, beta · u_r)``, ``[P]`` each (``u`` per token with ``length_norm``)."""
    cfg = inputs.config
    u_c = inputs.chosen_logps - inputs.ref_chosen_logps.detach()
    u_r = inputs.rejected_logps - inputs.ref_rejected_logps.detach()
    if cfg.length_norm:
        u_c = u_c / inputs.chosen_tokens.clamp(min=1)
        u_r = u_r / inputs.rejected_tokens.clamp(min=1)
    return cfg.beta * u_c, cfg.beta * u_r


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    kind: PairLoss = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean DPO (or IPO) loss of ``P`` pairs (``[P]`` tensors; a batch of ``[B = 2P]`` rows)
    and its statistics; formula in the module docstring. Token counts given: length-normalised
    (``u / n``).

    Args:
        chosen_logps, rejected_logps: ``[P]`` policy sequence log-probs (gradients flow).
        ref_chosen_logps, ref_rejected_logps: ``[P]`` reference sequence log-probs (constants).
        beta: ``> 0``; the sigmoid's temperature, or IPO's ``tau`` (target margin ``1/(2·beta)``).
        kind: ``sigmoid`` (DPO) or ``ipo``.
        label_smoothing: ``eps`` in ``[0, 0.5)`` (conservative DPO); sigmoid only.
        chosen_tokens, rejected_tokens: ``[P]`` token counts, for the length-normalised form.

    Returns:
        ``(loss, stats)``: a 0-dim loss and detached ``[]`` statistics ``reward_chosen``,
        ``reward_rejected``, ``reward_margin`` (means of the implicit rewards and of their
        difference) and ``preference_accuracy`` (share of pairs with a strictly larger chosen
        reward).
    """
    if kind not in PAIR_LOSSES:
        raise ValueError(f"unknown pair loss {kind!r}; expected one of {PAIR_LOSSES}")
    norm = chosen_tokens is not None or rejected_tokens is not None
    ones = torch.ones_like(chosen_logps)
    inputs = PairLossInputs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_tokens=ones if chosen_tokens is None else chosen_tokens.to(chosen_logps.dtype),
        rejected_tokens=ones if rejected_tokens is None else rejected_tokens.to(ones.dtype),
        config=DPOConfig(beta=beta, loss=kind, label_smoothing=label_smoothing, length_norm=norm),
    )
    loss, stats, _ = builtin_pair_loss(inputs)
    return loss, {k: torch.as_tensor(v) for k, v in stats.items()}


def builtin_pair_loss(inputs: PairLossInputs) -> LossOutput:
    """The built-in ``mode = "dpo"`` loss of ``[P]`` pairs (``[B = 2P]`` rows), the kind picked
    by ``algorithm.dpo.loss``: the mean of the module docstring's ``l``, and
    :func:`preference_stats`."""
    cfg = inputs.config
    _check(
        inputs.chosen_logps,
        inputs.rejected_logps,
        inputs.ref_chosen_logps,
        inputs.ref_rejected_logps,
        inputs.chosen_tokens,
        inputs.rejected_tokens,
    )
    if not cfg.beta > 0:
        raise ValueError(f"beta must be > 0; got {cfg.beta}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {cfg.label_smoothing}")
    reward_c, reward_r = implicit_rewards(inputs)
    margin = reward_c - reward_r  # beta · h
    if cfg.loss == "sigmoid":
        eps = cfg.label_smoothing
        per_pair = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    elif cfg.loss == "ipo":
        h = margin / cfg.beta
        per_pair = (h - 1 / (2 * cfg.beta)) ** 2
    else:
        raise ValueError(f"unknown pair loss {cfg.loss!r}; expected one of {PAIR_LOSSES}")
    return LossOutput(per_pair.mean(), preference_stats(reward_c, reward_r))


def preference_stats(reward_chosen: Tensor, reward_rejected: Tensor) -> dict[str, MetricValue]:
    """Detached means of the implicit rewards, their margin, and the ranking accuracy."""
    c, r = reward_chosen.detach(), reward_rejected.detach()
    return {
        "reward_chosen": c.mean(),
        "reward_rejected": r.mean(),
        "reward_margin": (c - r).mean(),
        "preference_accuracy": (c > r).to(c.dtype).mean(),
    }
