"""What one RL step trains towards: per-token advantages, old log-probs and the loss mask.

Computed once per training step on CPU, from the batch and one no-grad forward pass with the
weights before the step (:class:`PrePass`). With ``m`` the loss mask, ``r_b`` the reward of
sample ``b``, ``beta`` the KL coefficient and ``kl_bt`` the configured KL estimator between the
pre-step policy and the reference at token ``t``:

1. Shaping: ``r_b += overlong_penalty(response_length_b)`` when ``algorithm.overlong.enabled``.
2. Sequence advantage ``A_b = group_advantages(r, groups, estimator)``.
3. KL in the reward (``kl.placement = "reward"``): every response token earns the reward
   ``-beta · kl_bt`` and the outcome advantage ``A_b`` arrives at the end, so with reward-to-go
   (no discount) the per-token advantage is::

       A_bt = A_b - beta · sum_{t' >= t} m_bt' · kl_bt'

   Otherwise ``A_bt = A_b`` on every token.
4. The ``prepare_batch`` hook, if any, may replace rewards (then 2-3 are redone), advantages,
   the loss mask and the old log-probs (see :mod:`nexrl_async.train.hook`).
5. TIS (``algorithm.tis.enabled``): ``A_bt *= w_bt`` with ``w = tis_weights(trainer_old,
   rollout)``. Multiplying the advantage by ``w >= 0`` multiplies the clipped per-token PPO
   loss by ``w`` exactly (clip and dual-clip bounds are positively homogeneous in ``A``), so
   this is the weighted loss ``w · l``; weighted-out tokens still count in the denominator.

Old log-probs are the trainer's pre-step log-probs (``old_logprobs = "recompute"``) or the
server's (``"server"``, which needs a server log-prob on every loss token).

When the only optimizer step of the training step comes first (one minibatch, one epoch) and
neither KL in the reward, the hook nor TIS needs them before training, the trainer skips the
policy's pre-pass: the pre-step log-probs are then the training forward's own
(``PrePass.trainer_logprobs`` and ``UpdateTargets.old_logprobs`` are ``None``: the loss uses its
forward's detached log-probs), and :func:`forward_metrics` runs after the update on what that
forward captured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from nexrl_async.algorithms import (
    group_advantages,
    kl_estimate,
    overlong_penalty,
    tis_weights,
    zero_variance_groups,
)
from nexrl_async.config.training import AlgorithmConfig
from nexrl_async.core.errors import TrainError
from nexrl_async.train.hook import HookResult, PrepareBatchHook
from nexrl_async.train.tensors import SequenceBatch


@dataclass(frozen=True)
class PrePass:
    """No-grad results with the weights before the step, ``[B, T]`` float32 on CPU.

    ``trainer_logprobs`` is ``None`` when the policy's pre-pass is skipped (module docstring).
    """

    trainer_logprobs: Tensor | None
    entropy: Tensor | None
    ref_logprobs: Tensor | None


@dataclass(frozen=True)
class UpdateTargets:
    """Per-token inputs of the loss, ``[B, T]`` float32 on CPU."""

    loss_mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor | None
    """``None``: the loss forward's own log-probs, detached (pre-pass skipped)."""
    ref_logprobs: Tensor | None


def masked_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of ``values`` where ``mask != 0`` (0.0 for an empty mask)."""
    keep = mask != 0
    count = int(keep.sum())
    return float(torch.where(keep, values, 0.0).sum()) / count if count else 0.0


def masked_std(values: Tensor, mask: Tensor) -> float:
    """Population standard deviation of ``values`` where ``mask != 0`` (0.0 if empty)."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask) ** 0.5


def shaped_rewards(seq: SequenceBatch, algo: AlgorithmConfig, max_new_tokens: int) -> Tensor:
    """``[B]`` rewards plus the overlong penalty when it is enabled."""
    if not algo.overlong.enabled:
        return seq.rewards.clone()
    penalty = overlong_penalty(
        seq.response_lengths,
        max_len=max_new_tokens,
        buffer_len=min(algo.overlong.buffer_len, max_new_tokens),
        penalty_factor=algo.overlong.factor,
    )
    return seq.rewards + penalty


def kl_reward_advantages(advantages: Tensor, kl: Tensor, mask: Tensor, coef: float) -> Tensor:
    """``A_bt = A_b - coef · sum_{t' >= t} mask_bt' · kl_bt'``; ``[B]``, ``[B, T]`` → ``[B, T]``."""
    penalty = torch.where(mask != 0, kl, 0.0)
    to_go = penalty.flip(-1).cumsum(-1).flip(-1)
    return advantages.unsqueeze(-1) - coef * to_go


def token_advantages(
    rewards: Tensor,
    seq: SequenceBatch,
    mask: Tensor,
    algo: AlgorithmConfig,
    kl: Tensor | None,
    kl_coef: float,
) -> Tensor:
    """``[B, T]`` advantages from ``[B]`` rewards: steps 2 and 3 of the module docstring."""
    sequence = group_advantages(rewards, seq.group_index, estimator=algo.estimator)
    if algo.kl.placement == "reward" and kl is not None:
        return kl_reward_advantages(sequence, kl, mask, kl_coef)
    return sequence.unsqueeze(-1).expand(-1, seq.width).clone()


def build_targets(
    seq: SequenceBatch,
    prepass: PrePass,
    algo: AlgorithmConfig,
    *,
    step: int,
    kl_coef: float,
    max_new_tokens: int,
    hook: PrepareBatchHook | None,
) -> tuple[UpdateTargets, dict[str, float]]:
    """The loss targets of one RL step and the batch metrics (see the module docstring)."""
    rewards = shaped_rewards(seq, algo, max_new_tokens)
    mask = seq.loss_mask
    kl = _kl(prepass, algo)
    if algo.old_logprobs == "recompute":
        old = prepass.trainer_logprobs
    else:
        old = seq.rollout_logprobs
    advantages = token_advantages(rewards, seq, mask, algo, kl, kl_coef)
    result = HookResult()
    if hook is not None:
        inputs = _hook_inputs(seq, prepass, rewards=rewards, old=old, adv=advantages, step=step)
        result = hook(inputs)
        mask = result.loss_mask if result.loss_mask is not None else mask
        rewards = result.rewards if result.rewards is not None else rewards
        if result.rewards is not None or result.loss_mask is not None:
            advantages = token_advantages(rewards, seq, mask, algo, kl, kl_coef)
        if result.advantages is not None:
            advantages = _per_token(result.advantages, seq.width)
    if algo.old_logprobs == "server" and result.old_logprobs is None:
        _require_rollout(seq, mask, "algorithm.old_logprobs = 'server'")
    old = result.old_logprobs if result.old_logprobs is not None else old
    targets = UpdateTargets(
        loss_mask=mask, advantages=advantages, old_logprobs=old, ref_logprobs=prepass.ref_logprobs
    )
    metrics = batch_metrics(seq, prepass, targets, rewards=rewards, kl=kl)
    metrics.update(result.metrics)
    if algo.tis.enabled:
        targets, weight_mean = _apply_tis(seq, prepass, targets, algo)
        metrics["train/tis_weight_mean"] = weight_mean
    return targets, metrics


def _kl(prepass: PrePass, algo: AlgorithmConfig) -> Tensor | None:
    if prepass.ref_logprobs is None or prepass.trainer_logprobs is None:
        return None
    return kl_estimate(prepass.trainer_logprobs, prepass.ref_logprobs, algo.kl.kind)


def _trainer_logprobs(prepass: PrePass, why: str) -> Tensor:
    if prepass.trainer_logprobs is None:
        raise ValueError(f"{why} needs the pre-step log-probs, but the pre-pass was skipped")
    return prepass.trainer_logprobs


def _per_token(advantages: Tensor, width: int) -> Tensor:
    if advantages.dim() == 1:
        return advantages.unsqueeze(-1).expand(-1, width).clone()
    return advantages


def _require_rollout(seq: SequenceBatch, mask: Tensor, why: str) -> None:
    missing = int(((mask != 0) & ~seq.rollout_mask).sum())
    if missing:
        raise TrainError(
            f"{why} needs the server's log-prob on every loss token; {missing} have none"
        )


def _apply_tis(
    seq: SequenceBatch, prepass: PrePass, targets: UpdateTargets, algo: AlgorithmConfig
) -> tuple[UpdateTargets, float]:
    _require_rollout(seq, targets.loss_mask, "algorithm.tis")
    weights = tis_weights(
        _trainer_logprobs(prepass, "algorithm.tis"),
        seq.rollout_logprobs,
        targets.loss_mask,
        cap=algo.tis.cap,
        level=algo.tis.level,
        mode=algo.tis.mode,
    )
    weighted = replace(targets, advantages=targets.advantages * weights)
    return weighted, masked_mean(weights, targets.loss_mask)


def _hook_inputs(
    seq: SequenceBatch,
    prepass: PrePass,
    *,
    rewards: Tensor,
    old: Tensor | None,
    adv: Tensor,
    step: int,
) -> dict[str, Tensor]:
    trainer = _trainer_logprobs(prepass, "algorithm.prepare_batch")
    inputs = {
        "input_ids": seq.input_ids,
        "attention_mask": seq.attention_mask,
        "loss_mask": seq.loss_mask,
        "rewards": rewards,
        "raw_rewards": seq.rewards,
        "group_ids": seq.group_index,
        "response_lengths": seq.response_lengths,
        "trainer_logprobs": trainer,
        "rollout_logprobs": seq.rollout_logprobs,
        "rollout_mask": seq.rollout_mask,
        "old_logprobs": trainer if old is None else old,
        "advantages": adv,
        "step": torch.tensor(step, dtype=torch.int64),
    }
    if prepass.ref_logprobs is not None:
        inputs["ref_logprobs"] = prepass.ref_logprobs
    return inputs


def batch_metrics(
    seq: SequenceBatch,
    prepass: PrePass,
    targets: UpdateTargets,
    *,
    rewards: Tensor,
    kl: Tensor | None,
) -> dict[str, float]:
    """Batch statistics measured before any optimizer step (``train/...`` keys)."""
    mask = targets.loss_mask
    metrics = {
        "train/reward_mean": float(rewards.mean()),
        "train/advantage_mean": masked_mean(targets.advantages, mask),
        "train/advantage_std": masked_std(targets.advantages, mask),
        "train/response_len_mean": float((mask != 0).sum(dim=-1).float().mean()),
        "train/tokens": float(seq.lengths.sum()),
        "train/loss_tokens": float((mask != 0).sum()),
        "train/zero_variance_frac": float(
            zero_variance_groups(seq.rewards, seq.group_index).float().mean()
        ),
    }
    if prepass.trainer_logprobs is not None:
        metrics.update(forward_metrics(seq, mask, prepass.trainer_logprobs, prepass.entropy, kl))
    return metrics


def prepass_metrics(
    seq: SequenceBatch, prepass: PrePass, mask: Tensor, algo: AlgorithmConfig
) -> dict[str, float]:
    """:func:`forward_metrics` of a pre-pass whose ``trainer_logprobs`` are set."""
    logprobs = _trainer_logprobs(prepass, "prepass_metrics")
    return forward_metrics(seq, mask, logprobs, prepass.entropy, _kl(prepass, algo))


def forward_metrics(
    seq: SequenceBatch,
    mask: Tensor,
    trainer_logprobs: Tensor,
    entropy: Tensor | None,
    kl: Tensor | None,
) -> dict[str, float]:
    """``train/logprob_mismatch`` (trainer vs server log-probs where the server gave one),
    ``train/entropy`` and ``train/kl`` (means over ``mask``) of the pre-step weights."""
    metrics: dict[str, float] = {}
    if bool(seq.rollout_mask.any()):
        gap = (trainer_logprobs - seq.rollout_logprobs).abs()
        metrics["train/logprob_mismatch"] = masked_mean(gap, seq.rollout_mask)
    if entropy is not None:
        metrics["train/entropy"] = masked_mean(entropy, mask)
    if kl is not None:
        metrics["train/kl"] = masked_mean(kl, mask)
    return metrics


def pre_pass_optional(algo: AlgorithmConfig) -> bool:
    """Whether nothing needs the policy's pre-step log-probs before its one optimizer step."""
    return (
        algo.minibatches == 1
        and algo.epochs == 1
        and algo.kl.placement != "reward"
        and not algo.tis.enabled
        and algo.prepare_batch is None
    )


def has_dropout(model: torch.nn.Module) -> bool:
    """Active dropout makes the training forward differ from the eval-mode pre-pass."""
    config = getattr(model, "config", None)
    rates = [getattr(config, "attention_dropout", 0.0) or 0.0]
    rates += [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return any(float(rate) > 0 for rate in rates)
