"""The RL step skips the policy's no-grad pre-pass when nothing needs it, with the same result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from nexrl_async.config.training import AlgorithmConfig, KLConfig, TISConfig
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.microbatch import plan_micro_batches
from nexrl_async.train.packing import plan_costs
from nexrl_async.train.tensors import sequences_from_batch
from nexrl_async.train.trainer import Trainer

PROMPT = [1, 4, 5]
COMPARED = (
    "train/loss",
    "train/pg_loss",
    "train/logprob_mismatch",
    "train/entropy",
    "train/approx_kl",
    "train/grad_norm",
)


@pytest.fixture
def batch(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> TrainBatch:
    """Two groups of two, server log-probs on every response token (mismatch is reported)."""

    def traj(group: str, index: int, response: list[int], reward: float) -> Trajectory:
        logprobs = [-0.5 - 0.1 * i for i in range(len(response))]
        return make_traj(group, index, PROMPT, response, reward=reward, logprobs=logprobs)

    return make_batch(
        [traj("a", 0, [6, 7, 2], 1.0), traj("a", 1, [8, 9, 10, 11, 12, 2], 0.0)],
        [traj("b", 0, [13, 6, 9, 2], 0.0), traj("b", 1, [7, 2], 1.0)],
    )


def _trained(
    make_trainer: Callable[..., Trainer], batch: TrainBatch, algo: AlgorithmConfig, *, skip: bool
) -> tuple[Trainer, dict[str, float]]:
    trainer = make_trainer(algorithm=algo)
    assert trainer._skip_policy_pre_pass
    trainer._skip_policy_pre_pass = skip
    return trainer, trainer.step(batch)


@pytest.mark.parametrize(
    "algo",
    [
        AlgorithmConfig(),
        AlgorithmConfig(kl=KLConfig(placement="loss", coef=0.1)),
        AlgorithmConfig(entropy_coef=0.01),
        AlgorithmConfig(old_logprobs="server"),
    ],
    ids=["default", "kl-loss", "entropy-bonus", "server-old"],
)
def test_skipping_the_pre_pass_gives_the_same_update_and_metrics(
    make_trainer: Callable[..., Trainer], batch: TrainBatch, algo: AlgorithmConfig
) -> None:
    fast, fast_metrics = _trained(make_trainer, batch, algo, skip=True)
    full, full_metrics = _trained(make_trainer, batch, algo, skip=False)
    assert set(fast_metrics) == set(full_metrics)
    for (name, p), q in zip(fast.model.named_parameters(), full.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    keys = [*COMPARED, *(["train/kl", "train/kl_loss"] if algo.kl.placement == "loss" else [])]
    for key in keys:
        assert fast_metrics[key] == pytest.approx(full_metrics[key], abs=1e-5), key
    assert fast_metrics["train/logprob_mismatch"] > 0
    assert fast_metrics["train/entropy"] > 0
    assert fast_metrics["train/grad_norm"] > 0
    if algo.old_logprobs == "recompute":
        assert fast_metrics["train/approx_kl"] == pytest.approx(0.0, abs=1e-6)


def _count_forwards(module: torch.nn.Module, calls: list[int]) -> Any:
    def hook(*_: Any) -> None:
        calls.append(1)

    return module.register_forward_hook(hook)


@pytest.mark.parametrize(
    ("algo", "skips"),
    [
        (AlgorithmConfig(), True),
        (AlgorithmConfig(kl=KLConfig(placement="loss")), True),
        (AlgorithmConfig(minibatches=2), False),
        (AlgorithmConfig(epochs=2), False),
        (AlgorithmConfig(kl=KLConfig(placement="reward")), False),
        (AlgorithmConfig(tis=TISConfig(enabled=True)), False),
    ],
    ids=["default", "kl-loss", "minibatches", "epochs", "kl-reward", "tis"],
)
def test_the_policy_runs_one_forward_per_micro_batch_when_the_pre_pass_is_skipped(
    make_trainer: Callable[..., Trainer], batch: TrainBatch, algo: AlgorithmConfig, skips: bool
) -> None:
    trainer = make_trainer(algorithm=algo)
    assert trainer._skip_policy_pre_pass is skips
    seq = sequences_from_batch(batch, pad_token_id=trainer.pad_token_id)
    budget = trainer.config.micro_batch_tokens
    costs = plan_costs(trainer.model)  # the trainer's layout: packed or padded, by cost
    pre_pass = len(plan_micro_batches(seq.lengths, range(seq.size), budget, costs=costs))
    assert pre_pass >= 2
    calls: list[int] = []
    ref_calls: list[int] = []
    handles = [_count_forwards(trainer.model, calls)]
    if trainer.reference is not None:
        handles.append(_count_forwards(trainer.reference, ref_calls))
    try:
        trainer.step(batch)
    finally:
        for handle in handles:
            handle.remove()
    training = pre_pass * algo.epochs if algo.minibatches == 1 else len(calls) - pre_pass
    assert len(calls) == (training if skips else pre_pass + training)
    assert len(ref_calls) == (pre_pass if trainer.reference is not None else 0)
