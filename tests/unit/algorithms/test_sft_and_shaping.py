from __future__ import annotations

import pytest
import torch

from nexrl_async.algorithms import overlong_penalty, sft_loss

LOGPROBS = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -50.0, -60.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_sft_loss_hand_computed() -> None:
    assert sft_loss(LOGPROBS, MASK).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert sft_loss(LOGPROBS, MASK, agg="seq-mean-token-mean").item() == pytest.approx(3.0)
    assert sft_loss(LOGPROBS, MASK, agg="seq-mean-token-sum").item() == pytest.approx(5.0)
    assert sft_loss(LOGPROBS, MASK, agg="seq-mean-token-sum-norm").item() == pytest.approx(10 / 6)
    assert sft_loss(LOGPROBS, MASK, denominator=10).item() == pytest.approx(1.0)


def test_sft_gradient_is_minus_mask_over_count() -> None:
    logprobs = LOGPROBS.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sft_loss(logprobs, MASK), logprobs)
    torch.testing.assert_close(grad, -MASK.float() / 4)


def test_overlong_penalty_zones() -> None:
    lengths = torch.tensor([10, 16, 17, 18, 20, 21, 100])
    out = overlong_penalty(lengths, max_len=20, buffer_len=4)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]))
    half = overlong_penalty(lengths, max_len=20, buffer_len=4, penalty_factor=0.5)
    torch.testing.assert_close(half, out * 0.5)
    assert out.dtype == torch.float32


def test_overlong_penalty_without_buffer_is_hard() -> None:
    out = overlong_penalty(torch.tensor([0, 20, 21]), max_len=20, buffer_len=0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -1.0]))
    full = overlong_penalty(torch.tensor([0, 10, 20]), max_len=20, buffer_len=20)
    torch.testing.assert_close(full, torch.tensor([0.0, -0.5, -1.0]))


def test_overlong_penalty_validation() -> None:
    lengths = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty(lengths, max_len=0, buffer_len=0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=11)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=-1)
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(lengths, max_len=10, buffer_len=2, penalty_factor=-1)
    with pytest.raises(ValueError, match=r"\[B\]"):
        overlong_penalty(lengths.view(1, 2), max_len=10, buffer_len=2)
