from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nexrl_async.algorithms import group_advantages, zero_variance_groups

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def test_rloo_leave_one_out_known_vector() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0])
    advantages = group_advantages(rewards, [0, 0, 0], estimator="rloo")
    torch.testing.assert_close(advantages, torch.tensor([-1.5, 0.0, 1.5]))
    baselines = rewards - advantages
    torch.testing.assert_close(baselines, torch.tensor([2.5, 2.0, 1.5]))


def test_grpo_uses_unbiased_std() -> None:
    # mean 2, unbiased std 1 (a biased std sqrt(2/3) would give ±1.2247).
    advantages = group_advantages(torch.tensor([1.0, 2.0, 3.0]), [7, 7, 7], eps=0.0)
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 0.0, 1.0]))


def test_grpo_eps_in_denominator() -> None:
    advantages = group_advantages(torch.tensor([1.0, 3.0]), [0, 0], eps=0.5)
    std = math.sqrt(2.0)
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0]) / (std + 0.5))


def test_dr_grpo_subtracts_group_mean_only() -> None:
    advantages = group_advantages(torch.tensor([0.0, 0.0, 4.0]), [1, 1, 1], estimator="dr_grpo")
    torch.testing.assert_close(advantages, torch.tensor([-4 / 3, -4 / 3, 8 / 3]))


def test_interleaved_groups() -> None:
    rewards = torch.tensor([1.0, 10.0, 3.0, 20.0])
    advantages = group_advantages(rewards, ["a", "b", "a", "b"], estimator="dr_grpo")
    torch.testing.assert_close(advantages, torch.tensor([-1.0, -5.0, 1.0, 5.0]))
    rloo = group_advantages(rewards, ["a", "b", "a", "b"], estimator="rloo")
    torch.testing.assert_close(rloo, torch.tensor([-2.0, -10.0, 2.0, 10.0]))


def test_reinforce_pp_normalises_over_the_batch_and_ignores_groups() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # unbiased, batch mean 3
    expected = (rewards - 3.0) / (std + 1e-6)
    torch.testing.assert_close(
        group_advantages(rewards, [0, 0, 1, 1], estimator="reinforce_pp"), expected
    )
    torch.testing.assert_close(
        group_advantages(rewards, [0, 1, 2, 3], estimator="reinforce_pp"), expected
    )


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_group_of_one_gets_zero(estimator: str) -> None:
    advantages = group_advantages(
        torch.tensor([5.0, 1.0, 3.0]),
        [0, 1, 1],
        estimator=estimator,  # type: ignore[arg-type]
    )
    assert advantages[0].item() == 0.0
    assert advantages[1].item() < 0 < advantages[2].item()


def test_reinforce_pp_batch_of_one_and_flat_batch_get_zero() -> None:
    one = group_advantages(torch.tensor([3.0]), [0], estimator="reinforce_pp", eps=0.0)
    assert one.tolist() == [0.0]
    flat = group_advantages(torch.full((4,), 0.1), [0, 0, 1, 1], estimator="reinforce_pp", eps=0)
    assert flat.tolist() == [0.0] * 4


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_zero_variance_group_is_exactly_zero_even_without_eps(estimator: str) -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0])
    advantages = group_advantages(
        rewards,
        [0, 0, 0, 1, 1],
        estimator=estimator,  # type: ignore[arg-type]
        eps=0.0,
    )
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(advantages).all()


def test_group_id_forms_agree() -> None:
    rewards = torch.tensor([1.0, 4.0, 2.0, 8.0, 0.0])
    by_tensor = group_advantages(rewards, torch.tensor([3, 9, 3, 9, 3]))
    by_str = group_advantages(rewards, ["x", "y", "x", "y", "x"])
    by_tuple = group_advantages(rewards, [(1, "p"), (2, "p"), (1, "p"), (2, "p"), (1, "p")])
    torch.testing.assert_close(by_tensor, by_str)
    torch.testing.assert_close(by_tensor, by_tuple)


def test_dtypes() -> None:
    assert group_advantages(torch.tensor([0, 1, 1]), [0, 0, 0]).dtype == torch.float32
    wide = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert group_advantages(wide, [0, 0]).dtype == torch.float64
    assert not group_advantages(torch.tensor([0.0, 1.0], requires_grad=True), [0, 0]).requires_grad


def test_invalid_arguments() -> None:
    rewards = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(rewards, [0, 0], estimator="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="entries"):
        group_advantages(rewards, [0, 0, 0])
    with pytest.raises(ValueError, match="integer"):
        group_advantages(rewards, torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, math.nan]), [0, 0])
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(rewards.view(1, 2), [0, 0])
    with pytest.raises(ValueError, match="eps"):
        group_advantages(rewards, [0, 0], eps=-1.0)
    with pytest.raises(ValueError, match="string"):
        group_advantages(rewards, "ab")


def test_zero_variance_groups_flags() -> None:
    flags = zero_variance_groups(torch.tensor([1.0, 1.0, 3.0, 5.0, 2.0]), [0, 0, 1, 1, 2])
    assert flags.dtype == torch.bool
    assert flags.tolist() == [True, True, False, False, True]  # last: a group of one
    flags = zero_variance_groups(torch.tensor([0, 0, 1, 1]), torch.tensor([4, 5, 4, 5]))
    assert flags.tolist() == [False, False, False, False]


@st.composite
def grouped_rewards(draw: st.DrawFn) -> tuple[torch.Tensor, list[int]]:
    size = draw(st.integers(min_value=1, max_value=24))
    ids = draw(st.lists(st.integers(0, 5), min_size=size, max_size=size))
    values = draw(
        st.lists(
            st.floats(-10, 10, allow_nan=False) | st.sampled_from([0.0, 1.0]),
            min_size=size,
            max_size=size,
        )
    )
    return torch.tensor(values, dtype=torch.float64), ids


@settings(max_examples=60, deadline=None)
@given(batch=grouped_rewards(), estimator=st.sampled_from(GROUP_ESTIMATORS))
def test_advantages_sum_to_zero_within_each_group(
    batch: tuple[torch.Tensor, list[int]], estimator: str
) -> None:
    rewards, ids = batch
    advantages = group_advantages(rewards, ids, estimator=estimator)  # type: ignore[arg-type]
    for group in set(ids):
        members = [i for i, g in enumerate(ids) if g == group]
        assert abs(advantages[members].sum().item()) < 1e-6 * (1 + len(members))


@settings(max_examples=60, deadline=None)
@given(batch=grouped_rewards())
def test_rloo_matches_explicit_leave_one_out(batch: tuple[torch.Tensor, list[int]]) -> None:
    rewards, ids = batch
    advantages = group_advantages(rewards, ids, estimator="rloo")
    for i, group in enumerate(ids):
        others = [rewards[j].item() for j, g in enumerate(ids) if g == group and j != i]
        expected = rewards[i].item() - sum(others) / len(others) if others else 0.0
        if others and all(o == rewards[i].item() for o in others):
            expected = 0.0
        assert advantages[i].item() == pytest.approx(expected, abs=1e-9)
