"""DPO / IPO pair losses: the step-0 test vector (ln 2), hand-computed values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from nexrl_async.algorithms import PairLossInputs, builtin_pair_loss, dpo_loss
from nexrl_async.config.training import DPOConfig

F64 = torch.float64


def _pairs(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sigmoid_loss_is_ln2_when_policy_is_reference(beta: float, smoothing: float) -> None:
    logps = _pairs(-3.0, -10.5, -0.25)
    rejected = _pairs(-4.0, -2.0, -7.0)
    loss, stats = dpo_loss(logps, rejected, logps, rejected, beta=beta, label_smoothing=smoothing)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-12)
    assert float(stats["reward_margin"]) == 0.0
    assert float(stats["preference_accuracy"]) == 0.0  # ties count as wrong


def test_sigmoid_test_vector_value_and_gradient() -> None:
    # docs/algorithms.md: beta 0.1, u_c = 2, u_r = -1 -> h = 3, l = -log sigmoid(0.3)
    chosen = _pairs(-1.0).requires_grad_()
    rejected = _pairs(-6.0).requires_grad_()
    loss, stats = dpo_loss(chosen, rejected, _pairs(-3.0), _pairs(-5.0), beta=0.1)
    assert float(loss.detach()) == pytest.approx(0.554355244468527, abs=1e-12)
    loss.backward()
    assert chosen.grad is not None
    assert rejected.grad is not None
    assert float(chosen.grad) == pytest.approx(-0.0425557483188341, abs=1e-12)
    assert float(rejected.grad) == pytest.approx(0.0425557483188341, abs=1e-12)
    assert float(stats["reward_chosen"]) == pytest.approx(0.2)
    assert float(stats["reward_rejected"]) == pytest.approx(-0.1)
    assert float(stats["reward_margin"]) == pytest.approx(0.3)
    assert float(stats["preference_accuracy"]) == 1.0


def test_mean_over_pairs_and_label_smoothing() -> None:
    beta, eps = 0.5, 0.1
    chosen, rejected = _pairs(0.0, -2.0), _pairs(-1.0, 0.0)
    zero = _pairs(0.0, 0.0)
    loss, stats = dpo_loss(chosen, rejected, zero, zero, beta=beta, label_smoothing=eps)
    expected = 0.0
    for h in (1.0, -2.0):
        sig = 1 / (1 + math.exp(-beta * h))
        expected += -(1 - eps) * math.log(sig) - eps * math.log(1 - sig)
    assert float(loss) == pytest.approx(expected / 2, abs=1e-12)
    assert float(stats["preference_accuracy"]) == 0.5


def test_ipo_targets_a_margin_of_one_over_two_beta() -> None:
    beta = 0.25
    same = _pairs(-2.0, -3.0)
    loss, _ = dpo_loss(same, same, same, same, beta=beta, kind="ipo")
    assert float(loss) == pytest.approx(1 / (4 * beta**2))  # h = 0 at step 0
    chosen = _pairs(2.0).requires_grad_()  # h = 2 = 1 / (2 beta): the minimum
    loss, _ = dpo_loss(chosen, _pairs(0.0), _pairs(0.0), _pairs(0.0), beta=beta, kind="ipo")
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert chosen.grad is not None
    assert float(chosen.grad) == pytest.approx(0.0, abs=1e-12)


def test_length_norm_divides_each_ratio_by_its_tokens() -> None:
    chosen, rejected = _pairs(-2.0), _pairs(-9.0)
    ref_c, ref_r = _pairs(-4.0), _pairs(-3.0)
    loss, stats = dpo_loss(
        chosen,
        rejected,
        ref_c,
        ref_r,
        beta=1.0,
        chosen_tokens=torch.tensor([4]),
        rejected_tokens=torch.tensor([3]),
    )
    h = 2.0 / 4 - (-6.0) / 3  # 2.5
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-h))), abs=1e-12)
    assert float(stats["reward_chosen"]) == pytest.approx(0.5)
    assert float(stats["reward_rejected"]) == pytest.approx(-2.0)


def test_builtin_pair_loss_reads_its_config() -> None:
    inputs = PairLossInputs(
        chosen_logps=_pairs(-1.0),
        rejected_logps=_pairs(-1.0),
        ref_chosen_logps=_pairs(-1.0),
        ref_rejected_logps=_pairs(-1.0),
        chosen_tokens=_pairs(1.0),
        rejected_tokens=_pairs(1.0),
        config=DPOConfig(beta=2.0, loss="ipo"),
    )
    loss, metrics, parts = builtin_pair_loss(inputs)
    assert float(loss) == pytest.approx(1 / 16)
    assert set(metrics) == {
        "reward_chosen",
        "reward_rejected",
        "reward_margin",
        "preference_accuracy",
    }
    assert parts == {}


@pytest.mark.parametrize(
    ("shapes", "message"),
    [(((2,), (3,)), "share"), (((0,), (0,)), "P >= 1"), (((2, 1), (2, 1)), "\\[P\\]")],
)
def test_bad_shapes_raise(shapes: tuple[tuple[int, ...], tuple[int, ...]], message: str) -> None:
    a, b = (torch.zeros(s, dtype=F64) for s in shapes)
    with pytest.raises(ValueError, match=message):
        dpo_loss(a, b, a, b)


def test_bad_constants_raise() -> None:
    x = _pairs(0.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="unknown pair loss"):
        dpo_loss(x, x, x, x, kind="hinge")  # type: ignore[arg-type]
