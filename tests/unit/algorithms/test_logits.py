from __future__ import annotations

import math

import pytest
import torch

from nexrl_async.algorithms import entropy_from_logits, logprobs_from_logits
from nexrl_async.algorithms.logits import HALF_PRECISION_CHUNK_ROWS


def _reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def test_entropy_known_values() -> None:
    uniform = torch.zeros(2, 3, 4)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(4)))
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.tensor([0.0, math.log(3.0)])  # p = [1/4, 3/4]
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(two).item() == pytest.approx(expected, rel=1e-6)


def test_entropy_matches_reference_and_is_stable() -> None:
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(
        entropy_from_logits(logits).double(), _reference_entropy(logits), atol=1e-5, rtol=1e-5
    )
    shifted = entropy_from_logits(logits + 1e4)
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted.double(), _reference_entropy(logits), atol=1e-2, rtol=0)


def test_entropy_upcasts_half_precision() -> None:
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = entropy_from_logits(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference_entropy(logits.float()), atol=1e-5, rtol=0)


def test_entropy_is_differentiable() -> None:
    logits = torch.randn(2, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(entropy_from_logits(logits).sum(), logits)
    (expected,) = torch.autograd.grad(_reference_entropy(logits).sum(), logits)
    torch.testing.assert_close(grad, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_logprobs_match_log_softmax_gather(temperature: float) -> None:
    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 6, 13, generator=generator) * 3).requires_grad_(True)
    labels = torch.randint(0, 13, (2, 6), generator=generator)
    got = logprobs_from_logits(logits, labels, temperature=temperature)
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(got, expected)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_expected,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(g_got, g_expected)


def test_logprobs_known_value() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [1/4, 3/4]
    got = logprobs_from_logits(logits, torch.tensor([1]))
    assert got.item() == pytest.approx(math.log(0.75))
    hot = logprobs_from_logits(logits, torch.tensor([1]), temperature=0.5)  # p ∝ [1, 9]
    assert hot.item() == pytest.approx(math.log(0.9))


def test_logprobs_half_precision_chunks_across_rows() -> None:
    generator = torch.Generator().manual_seed(3)
    rows = HALF_PRECISION_CHUNK_ROWS + 37
    logits = torch.randn(1, rows, 8, generator=generator).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 8, (1, rows), generator=generator)
    got = logprobs_from_logits(logits, labels, temperature=0.9)
    assert got.dtype == torch.float32
    assert got.shape == (1, rows)
    expected = torch.log_softmax(logits.float() / 0.9, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert grad.dtype == torch.bfloat16
    assert torch.isfinite(grad.float()).all()


def test_logprobs_empty_and_invalid() -> None:
    empty = logprobs_from_logits(
        torch.zeros(0, 5, dtype=torch.float16), torch.zeros(0, dtype=torch.long)
    )
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
