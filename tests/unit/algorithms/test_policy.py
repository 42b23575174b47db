from __future__ import annotations

import math

import pytest
import torch

from nexrl_async.algorithms import aggregate, policy_loss

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
ADV = torch.tensor([1.5, -2.0, 3.0])


def _logprobs() -> torch.Tensor:
    return -torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) * 3


def test_step_zero_ratio_is_one_and_stats_are_zero() -> None:
    logprobs = _logprobs().requires_grad_(True)
    loss, stats = policy_loss(logprobs, logprobs.detach().clone(), ADV, MASK)
    # token-mean of -A over 5 tokens: 3 tokens of -1.5, 2 tokens of +2.0.
    assert loss.item() == pytest.approx((3 * -1.5 + 2 * 2.0) / 5)
    assert stats["clip_frac_high"].item() == 0.0
    assert stats["clip_frac_low"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_max"].item() == pytest.approx(1.0)
    assert "dual_clip_frac" not in stats
    assert all(not s.requires_grad for s in stats.values())


@pytest.mark.parametrize("per_token", [False, True])
def test_step_zero_gradient_is_minus_advantage_over_token_count(per_token: bool) -> None:
    logprobs = _logprobs().requires_grad_(True)
    adv = ADV.unsqueeze(-1).expand(3, 4).clone() if per_token else ADV
    loss, _ = policy_loss(logprobs, logprobs.detach().clone(), adv, MASK)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = -ADV.unsqueeze(-1) * MASK.float() / 5
    torch.testing.assert_close(grad, expected)


def test_step_zero_gradient_with_global_denominator() -> None:
    logprobs = _logprobs().requires_grad_(True)
    loss, _ = policy_loss(logprobs, logprobs.detach().clone(), ADV, MASK, denominator=20)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, -ADV.unsqueeze(-1) * MASK.float() / 20)


def test_step_zero_gradient_seq_mean_token_mean() -> None:
    logprobs = _logprobs().requires_grad_(True)
    loss, _ = policy_loss(logprobs, logprobs.detach().clone(), ADV, MASK, agg="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, logprobs)
    lengths = MASK.sum(dim=-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(grad, -ADV.unsqueeze(-1) * MASK.float() / lengths / 2)


def _one_token_each(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((len(ratios), 1), -1.0)
    new = (old + torch.log(torch.tensor(ratios)).unsqueeze(-1)).requires_grad_(True)
    return new, old


def test_symmetric_clip_hand_computed() -> None:
    # rho = 1.5, A = +1: max(-1.5, -1.2) = -1.2, clipped high, no gradient.
    # rho = 0.5, A = +1: max(-0.5, -0.8) = -0.5, unclipped, grad -A·rho = -0.5.
    # rho = 0.5, A = -1: max(0.5, 0.8) = 0.8, clipped low, no gradient.
    # rho = 1.5, A = -1: max(1.5, 1.2) = 1.5, unclipped, grad -A·rho = 1.5.
    new, old = _one_token_each([1.5, 0.5, 0.5, 1.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(4, 1)
    loss, stats = policy_loss(new, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    (grad,) = torch.autograd.grad(loss, new)
    torch.testing.assert_close(grad, torch.tensor([[0.0], [-0.5 / 4], [0.0], [1.5 / 4]]))
    assert stats["clip_frac_high"].item() == pytest.approx(0.25)
    assert stats["clip_frac_low"].item() == pytest.approx(0.25)
    k3 = {r: r - 1 - math.log(r) for r in (1.5, 0.5)}
    assert stats["approx_kl"].item() == pytest.approx((k3[1.5] + k3[0.5]) / 2, rel=1e-5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_max"].item() == pytest.approx(1.5)


def test_clip_higher_is_asymmetric() -> None:
    # rho = 1.25 with A > 0: clipped at 1.2 by the symmetric range, free under clip_high 0.28.
    # rho = 0.75 with A < 0: clipped at 0.8 by clip_low 0.2 in both cases.
    new, old = _one_token_each([1.25, 0.75])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1)
    symmetric, s_stats = policy_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.2)
    higher, h_stats = policy_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert symmetric.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert higher.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert s_stats["clip_frac_high"].item() == pytest.approx(0.5)
    assert h_stats["clip_frac_high"].item() == 0.0
    assert h_stats["clip_frac_low"].item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(higher, new)
    torch.testing.assert_close(grad, torch.tensor([[-1.25 / 2], [0.0]]))
    # A wider clip_low frees the lower token instead.
    lower, l_stats = policy_loss(new, old, adv, mask, clip_low=0.28, clip_high=0.2)
    assert lower.item() == pytest.approx((-1.2 + 0.75) / 2)
    assert l_stats["clip_frac_low"].item() == 0.0


def test_dual_clip_bounds_negative_advantages() -> None:
    new, old = _one_token_each([math.exp(2.0), math.exp(2.0), 1.1])
    adv = torch.tensor([-1.0, 2.0, -1.0])
    mask = torch.ones(3, 1)
    plain, _ = policy_loss(new, old, adv, mask)
    dual, stats = policy_loss(new, old, adv, mask, dual_clip_c=3.0)
    e2 = math.exp(2.0)
    # A = -1: plain max(e², 1.2) = e²; dual min(e², 3) = 3. A = +2: -2·1.2 both. rho = 1.1: 1.1.
    assert plain.item() == pytest.approx((e2 - 2.4 + 1.1) / 3, rel=1e-5)
    assert dual.item() == pytest.approx((3.0 - 2.4 + 1.1) / 3, rel=1e-5)
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(dual, new)
    torch.testing.assert_close(grad, torch.tensor([[0.0], [0.0], [1.1 / 3]]))


def test_dual_clip_bound_holds_for_wild_ratios() -> None:
    generator = torch.Generator().manual_seed(1)
    old = -torch.rand(8, 16, generator=generator) * 5
    new = old + torch.randn(8, 16, generator=generator) * 4
    adv = -torch.rand(8, generator=generator) - 0.1
    mask = torch.ones(8, 16)
    c = 2.5
    loss, _ = policy_loss(new, old, adv, mask, dual_clip_c=c, agg="seq-mean-token-sum")
    bound = (c * adv.abs() * 16).mean()
    assert loss.item() <= bound.item() + 1e-5
    unbounded, _ = policy_loss(new, old, adv, mask, agg="seq-mean-token-sum")
    assert unbounded.item() > bound.item()


def test_agg_is_passed_through() -> None:
    logprobs = _logprobs()
    per_token = -ADV.unsqueeze(-1).expand(3, 4)
    for mode in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        loss, _ = policy_loss(logprobs, logprobs, ADV, MASK, agg=mode, norm_constant=7)
        expected = aggregate(per_token, MASK, mode, norm_constant=7)
        assert loss.item() == pytest.approx(expected.item())


def test_padding_garbage_does_not_leak() -> None:
    logprobs = _logprobs()
    old = logprobs.clone()
    old[MASK == 0] = -1e9
    logprobs.requires_grad_(True)
    loss, stats = policy_loss(logprobs, old, ADV, MASK)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(s) for s in stats.values())
    assert stats["ratio_max"].item() == pytest.approx(1.0)
    assert torch.equal(grad[MASK == 0], torch.zeros(int((MASK == 0).sum())))


def test_empty_mask_gives_zero_loss_and_stats() -> None:
    logprobs = _logprobs()
    loss, stats = policy_loss(logprobs, logprobs + 1, ADV, torch.zeros(3, 4), dual_clip_c=2.0)
    assert loss.item() == 0.0
    assert all(s.item() == 0.0 for s in stats.values())


def test_invalid_arguments() -> None:
    lp = _logprobs()
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(lp, lp, ADV, MASK, clip_low=1.5)
    with pytest.raises(ValueError, match="clip_high"):
        policy_loss(lp, lp, ADV, MASK, clip_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip_c"):
        policy_loss(lp, lp, ADV, MASK, dual_clip_c=1.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, lp, ADV[:2], MASK)
    with pytest.raises(ValueError, match="share"):
        policy_loss(lp, lp[:, :3], ADV, MASK)
    with pytest.raises(ValueError, match="mode"):
        policy_loss(lp, lp, ADV, MASK, agg="sum")  # type: ignore[arg-type]
