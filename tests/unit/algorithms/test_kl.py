from __future__ import annotations

import math

import pytest
import torch

from nexrl_async.algorithms import AdaptiveKLController, FixedKLController, kl_estimate

KINDS = ("k1", "abs", "k2", "k3")


@pytest.mark.parametrize("kind", KINDS)
def test_zero_when_equal(kind: str) -> None:
    logprobs = -torch.rand(4, 6) * 5
    out = kl_estimate(logprobs, logprobs.clone(), kind)  # type: ignore[arg-type]
    assert out.shape == (4, 6)
    assert torch.equal(out, torch.zeros(4, 6))


def test_hand_computed() -> None:
    logprobs = torch.tensor([[0.0, -1.0]])
    ref = torch.tensor([[-1.0, 0.0]])
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k1"), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(kl_estimate(logprobs, ref, "abs"), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k2"), torch.tensor([[0.5, 0.5]]))
    # d = ref - logprobs = [-1, 1]: exp(d) - d - 1.
    expected = torch.tensor([[math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1]])
    torch.testing.assert_close(kl_estimate(logprobs, ref, "k3"), expected)


def test_k3_clamps() -> None:
    logprobs = torch.tensor([0.0, 50.0, -2.0, -3.0])
    ref = torch.tensor([50.0, 0.0, 0.0, 0.0])
    out = kl_estimate(logprobs, ref, "k3")
    # d = 50 -> clamp 20 -> huge -> 10; d = -50 -> clamp -20 -> 19 -> 10; d = 2 -> e² - 3;
    # d = 3 -> e³ - 4 = 16.1 -> 10.
    torch.testing.assert_close(out, torch.tensor([10.0, 10.0, math.exp(2) - 3, 10.0]))
    assert torch.isfinite(out).all()


def test_k1_and_k3_estimate_kl_by_monte_carlo() -> None:
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    logp, logq = p.log()[samples], q.log()[samples]
    for kind in ("k1", "k3"):
        estimate = kl_estimate(logp, logq, kind).mean().item()
        assert estimate == pytest.approx(true_kl, abs=5e-3), kind


def test_gradient_flows_through_logprobs() -> None:
    logprobs = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.5])
    (grad,) = torch.autograd.grad(kl_estimate(logprobs, ref, "k2").sum(), logprobs)
    torch.testing.assert_close(grad, torch.tensor([0.5, -0.5]))


def test_kl_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="match"):
        kl_estimate(torch.zeros(2), torch.zeros(3), "k1")


def test_fixed_controller() -> None:
    controller = FixedKLController(0.05)
    controller.update(10.0, 100)
    assert controller.coef == 0.05
    assert controller.state_dict() == {"coef": 0.05}
    restored = FixedKLController(1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.coef == 0.05
    assert FixedKLController(0.0).coef == 0.0
    with pytest.raises(ValueError, match="coef"):
        FixedKLController(-0.1)
    with pytest.raises(ValueError, match="coef"):
        FixedKLController(math.nan)


def test_adaptive_controller_follows_the_rule() -> None:
    controller = AdaptiveKLController(init_coef=0.1, target_kl=0.05, horizon=100)
    controller.update(0.055, 10)  # error 0.1 -> x (1 + 0.1·10/100)
    assert controller.coef == pytest.approx(0.1 * 1.01)
    controller.update(1.0, 10)  # error 19 -> clipped 0.2 -> x 1.02
    assert controller.coef == pytest.approx(0.1 * 1.01 * 1.02)
    controller.update(0.0, 50)  # error -1 -> clipped -0.2 -> x (1 - 0.2·0.5)
    assert controller.coef == pytest.approx(0.1 * 1.01 * 1.02 * 0.9)
    before = controller.coef
    controller.update(0.05, 10)  # on target: unchanged
    assert controller.coef == pytest.approx(before)
    controller.update(-0.3, 0)  # zero steps: unchanged
    assert controller.coef == pytest.approx(before)


def test_adaptive_controller_state_round_trip() -> None:
    controller = AdaptiveKLController(0.2, 0.1, 1000)
    controller.update(0.3, 500)
    state = controller.state_dict()
    restored = AdaptiveKLController(0.2, 0.1, 1000)
    restored.load_state_dict(state)
    assert restored.coef == controller.coef == pytest.approx(0.2 * 1.1)
    restored.update(0.3, 500)
    controller.update(0.3, 500)
    assert restored.coef == controller.coef


def test_adaptive_controller_validation() -> None:
    for args in (
        (0.0, 0.1, 10),
        (0.1, 0.0, 10),
        (0.1, 0.1, 0),
        (-1, 0.1, 10),
        (0.1, 0.1, math.inf),
    ):
        with pytest.raises(ValueError, match="must be finite and > 0"):
            AdaptiveKLController(*args)
    controller = AdaptiveKLController(0.1, 0.1, 10)
    with pytest.raises(ValueError, match="current_kl"):
        controller.update(math.nan, 1)
    with pytest.raises(ValueError, match="n_steps"):
        controller.update(0.1, 11)
    with pytest.raises(ValueError, match="n_steps"):
        controller.update(0.1, -1)
    with pytest.raises(ValueError, match="coef"):
        controller.load_state_dict({"coef": 0.0})
    with pytest.raises(ValueError, match="key"):
        controller.load_state_dict({"beta": 0.1})
    with pytest.raises(ValueError, match="non-finite"):
        controller.load_state_dict({"coef": math.inf})
