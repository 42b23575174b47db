from __future__ import annotations

import math

import pytest
import torch

from nexrl_async.algorithms import aggregate, policy_loss, tis_weights


def test_token_level_truncate_and_mask() -> None:
    trainer = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.3)]])
    rollout = torch.tensor([[math.log(0.25), math.log(0.9), math.log(0.6)]])
    mask = torch.tensor([[1, 1, 1]])
    # w = [2, 1, 0.5]
    truncated = tis_weights(trainer, rollout, mask, cap=1.5)
    torch.testing.assert_close(truncated, torch.tensor([[1.5, 1.0, 0.5]]))
    masked = tis_weights(trainer, rollout, mask, cap=1.5, mode="mask")
    torch.testing.assert_close(masked, torch.tensor([[0.0, 1.0, 0.5]]))
    exactly_cap = tis_weights(trainer, rollout, mask, cap=2.0, mode="mask")
    torch.testing.assert_close(exactly_cap, torch.tensor([[2.0, 1.0, 0.5]]), rtol=1e-6, atol=0)


def test_sequence_level_uses_the_masked_log_ratio_sum() -> None:
    trainer = torch.tensor([[math.log(2.0), math.log(1.5), 100.0], [0.0, 0.0, 0.0]])
    rollout = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # Row 0: log w = log 2 + log 1.5 = log 3 (the masked 100 is ignored); row 1: w = 1.
    free = tis_weights(trainer, rollout, mask, cap=5.0, level="sequence")
    torch.testing.assert_close(free, torch.tensor([[3.0, 3.0, 0.0], [1.0, 0.0, 0.0]]))
    truncated = tis_weights(trainer, rollout, mask, cap=2.0, level="sequence")
    torch.testing.assert_close(truncated, torch.tensor([[2.0, 2.0, 0.0], [1.0, 0.0, 0.0]]))
    rejected = tis_weights(trainer, rollout, mask, cap=2.0, level="sequence", mode="mask")
    torch.testing.assert_close(rejected, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


def test_equal_logprobs_give_the_mask_and_weights_are_detached() -> None:
    logprobs = (-torch.rand(3, 5)).requires_grad_(True)
    mask = torch.rand(3, 5) > 0.4
    for level in ("token", "sequence"):
        out = tis_weights(logprobs, logprobs.detach(), mask, cap=2.0, level=level)
        assert not out.requires_grad
        torch.testing.assert_close(out, mask.float())


def test_extreme_ratios_stay_finite() -> None:
    trainer = torch.tensor([[0.0, 0.0]])
    rollout = torch.tensor([[-1e4, 1e4]])
    out = tis_weights(trainer, rollout, torch.ones(1, 2), cap=3.0)
    torch.testing.assert_close(out, torch.tensor([[3.0, math.exp(-20)]]))


def test_invalid_arguments() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cap"):
        tis_weights(x, x, x, cap=0.0)
    with pytest.raises(ValueError, match="level"):
        tis_weights(x, x, x, cap=2.0, level="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        tis_weights(x, x, x, cap=2.0, mode="clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="share"):
        tis_weights(x, x[:, :2], x, cap=2.0)


def _reference_ppo_tokens(
    logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, c: float
) -> torch.Tensor:
    ratio = torch.exp(logprobs - old)
    a = adv.unsqueeze(-1)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    return torch.where(a < 0, torch.minimum(loss, -a * c), loss)


def test_weights_apply_through_per_token_advantages() -> None:
    # For w >= 0, w · ppo_token_loss(A) == ppo_token_loss(w · A) (max/min are positively
    # homogeneous and w keeps the sign of A), so the trainer applies TIS weights by passing
    # A[:, None] * w as [B, T] advantages.
    generator = torch.Generator().manual_seed(5)
    old = -torch.rand(4, 6, generator=generator) * 3
    logprobs = old + torch.randn(4, 6, generator=generator) * 0.8
    rollout = old + torch.randn(4, 6, generator=generator) * 0.5
    adv = torch.tensor([1.0, -2.0, 0.5, -0.3])
    mask = torch.rand(4, 6, generator=generator) > 0.3
    weights = tis_weights(old, rollout, mask, cap=1.5, mode="mask")
    assert (weights[mask] == 0).any()
    assert (weights[mask] > 1).any()
    expected = aggregate(
        _reference_ppo_tokens(logprobs, old, adv, 3.0) * weights, mask, "token-mean"
    )
    got, _ = policy_loss(
        logprobs, old, adv.unsqueeze(-1) * weights, mask, clip_high=0.28, dual_clip_c=3.0
    )
    torch.testing.assert_close(got, expected)
