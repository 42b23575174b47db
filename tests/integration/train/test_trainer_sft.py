"""SFT steps: cross-entropy on the loss-masked tokens."""

from __future__ import annotations

from collections.abc import Callable

from nexrl_async.config.training import AlgorithmConfig, KLConfig
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.logprobs import batch_logprobs
from nexrl_async.train.tensors import sequences_from_batch
from nexrl_async.train.trainer import Trainer


def _nll(trainer: Trainer, batch: TrainBatch) -> float:
    seq = sequences_from_batch(batch, pad_token_id=trainer.pad_token_id)
    logprobs, _ = batch_logprobs(trainer.model, seq, token_budget=1000, temperature=1.0)
    return float(-(logprobs * seq.loss_mask).sum() / seq.loss_mask.sum())


def test_sft_lowers_the_nll_of_the_target_tokens_only(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
) -> None:
    # reward and server log-probs are irrelevant to SFT; KL settings are ignored (no reference)
    trainer = make_trainer(
        algorithm=AlgorithmConfig(mode="sft", kl=KLConfig(placement="loss")), temperature=0.3
    )
    assert trainer.reference is None
    batch = make_batch(
        [make_traj("a", 0, [1, 4, 5], [6, 7, 2], reward=-3.0)],
        [make_traj("b", 0, [1, 8], [9, 10, 11, 2], logprobs=[-9.0] * 4)],
    )
    start = _nll(trainer, batch)
    losses = [trainer.step(batch)["train/loss"] for _ in range(5)]
    assert abs(losses[0] - start) < 1e-5  # the first step reports the pre-update loss
    assert losses[-1] < losses[0]
    assert _nll(trainer, batch) < 0.6 * start
    metrics = trainer.step(batch)
    assert metrics["train/loss_tokens"] == 7.0
    assert {"train/grad_norm", "train/lr", "train/nll", "train/step_s"} <= metrics.keys()
    assert "train/advantage_mean" not in metrics
