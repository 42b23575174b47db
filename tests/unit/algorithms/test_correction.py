from __future__ import annotations

import math

import pytest
import torch

from nexrl_async.algorithms import tis_weights


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
