"""The ``algorithm.loss`` seam: a user loss trains exactly like the built-in it reimplements.

The user file below writes the token-mean GRPO loss (PPO-clip surrogate on group advantages,
token-mean over the loss tokens with the global denominator) from scratch, without calling the
package's policy loss. One step with it and one with the built-in, from the same weights on the
same batch (two minibatches, so the denominator and the ratio are both exercised), must leave
the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nexrl_async.algorithms import TokenLossInputs
from nexrl_async.config.training import AlgorithmConfig
from nexrl_async.core.errors import TrainError, UserCodeError
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.trainer import Trainer

GRPO_LOSS = '''
import torch


def grpo_token_mean(inputs):
    """Token-mean PPO-clip surrogate: sum over loss tokens / global token count."""
    algo = inputs.algorithm
    ratio = torch.exp((inputs.logprobs - inputs.old_logprobs).clamp(-20.0, 20.0))
    adv = inputs.advantages
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - algo.clip_low, 1.0 + algo.clip_high)
    per_token = torch.where(clipped > unclipped, clipped, unclipped)
    keep = inputs.loss_mask != 0
    loss = torch.where(keep, per_token, torch.zeros_like(per_token)).sum() / inputs.denominator
    return loss, {"ratio_mean_custom": ratio.detach()[keep].mean()}


def broken(inputs):
    raise KeyError("no such tensor")


def not_a_scalar(inputs):
    return inputs.logprobs, {}
'''


@pytest.fixture
def loss_file(tmp_path: Path) -> Path:
    (tmp_path / "losses.py").write_text(GRPO_LOSS)
    return tmp_path


@pytest.fixture
def batch(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> TrainBatch:
    return make_batch(
        [
            make_traj("a", 0, [1, 4, 5], [6, 7, 8, 2], reward=1.0),
            make_traj("a", 1, [1, 4, 5], [9, 2], reward=0.0),
            make_traj("a", 2, [1, 4, 5], [10, 11, 12, 13, 2], reward=0.5),
        ],
        [
            make_traj("b", 0, [1, 12, 3], [13, 2], reward=1.0),
            make_traj("b", 1, [1, 12, 3], [9, 9, 9, 2], reward=0.0),
        ],
    )


def _algo(**kwargs: object) -> AlgorithmConfig:
    # two optimizer steps: the second one's ratio is not 1, so the clip matters
    return AlgorithmConfig(loss_agg="token-mean", minibatches=2, clip_low=0.1, **kwargs)  # type: ignore[arg-type]


def test_custom_grpo_loss_gives_the_builtin_update(
    make_trainer: Callable[..., Trainer], batch: TrainBatch, loss_file: Path
) -> None:
    builtin = make_trainer(algorithm=_algo())
    custom = make_trainer(algorithm=_algo(loss="losses.py:grpo_token_mean"), base_dir=loss_file)
    before = {n: p.detach().clone() for n, p in builtin.model.named_parameters()}
    expected = builtin.step(batch)
    got = custom.step(batch)
    moved = 0.0
    for (name, a), (_, b) in zip(
        builtin.model.named_parameters(), custom.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=0, msg=name)
        moved = max(moved, float((a.detach() - before[name]).abs().max()))
    assert moved > 1e-3, "the step must move the weights for the comparison to mean something"
    assert got["train/loss"] == pytest.approx(expected["train/loss"], abs=1e-7)
    assert got["train/user/ratio_mean_custom"] == pytest.approx(
        expected["train/ratio_mean"], abs=1e-6
    )
    assert "train/pg_loss" in expected
    assert "train/pg_loss" not in got


def test_a_python_callable_is_accepted(
    make_trainer: Callable[..., Trainer], batch: TrainBatch
) -> None:
    seen: list[TokenLossInputs] = []

    def nll(inputs: TokenLossInputs) -> tuple[torch.Tensor, dict[str, float]]:
        seen.append(inputs)
        return inputs.aggregate(-inputs.logprobs), {}

    # the schema types the field as a reference; code that builds the config may set a callable
    trainer = make_trainer(algorithm=AlgorithmConfig(mode="sft", loss=nll))  # type: ignore[arg-type]
    metrics = trainer.step(batch)
    reference = make_trainer(algorithm=AlgorithmConfig(mode="sft")).step(batch)
    assert metrics["train/loss"] == pytest.approx(reference["train/loss"], abs=1e-7)
    assert seen
    assert seen[0].old_logprobs is None
    assert seen[0].advantages is None
    assert seen[0].logprobs.requires_grad


def test_user_errors_name_the_loss(
    make_trainer: Callable[..., Trainer], batch: TrainBatch, loss_file: Path
) -> None:
    broken = make_trainer(algorithm=_algo(loss="losses.py:broken"), base_dir=loss_file)
    with pytest.raises(UserCodeError, match=r"losses.py:broken raised KeyError"):
        broken.step(batch)
    shaped = make_trainer(algorithm=_algo(loss="losses.py:not_a_scalar"), base_dir=loss_file)
    with pytest.raises(TrainError, match="must be a 0-dim tensor"):
        shaped.step(batch)
    with pytest.raises(UserCodeError, match="has no attribute 'missing'"):
        make_trainer(algorithm=_algo(loss="losses.py:missing"), base_dir=loss_file)
