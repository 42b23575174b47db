"""Validation loss: mean NLL per loss-masked token, in no-grad eval mode, weights untouched."""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec
import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from nexrl_async.config.model import CharTokenizer
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import FailureReason, Status, TrainBatch, Trajectory
from nexrl_async.train.build import build_char_tokenizer
from nexrl_async.train.trainer import Trainer

MakeTraj = Callable[..., Trajectory]
MakeBatch = Callable[..., TrainBatch]


def make_trainer(model: PreTrainedModel, micro_batch_tokens: int = 64) -> Trainer:
    return Trainer(
        model,
        build_char_tokenizer(CharTokenizer()),
        algorithm=AlgorithmConfig(mode="sft", loss_agg="seq-mean-token-sum"),
        optim=OptimConfig(lr=1e-2),
        trainer=TrainerConfig(micro_batch_tokens=micro_batch_tokens, threads=1),
        max_new_tokens=8,
    )


def reference_nll(model: PreTrainedModel, trajs: list[Trajectory]) -> tuple[float, int]:
    """Summed NLL of every trajectory's response tokens, one unpadded forward per row."""
    total, count = 0.0, 0
    with torch.no_grad():
        for traj in trajs:
            ids = torch.tensor([traj.token_ids])
            logits = model(input_ids=ids).logits[0, :-1].double()
            nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
            mask = torch.tensor(traj.loss_mask[1:], dtype=torch.bool)
            total += float(nll[mask].sum())
            count += int(mask.sum())
    return total, count


@pytest.fixture
def batch(make_traj: MakeTraj, make_batch: MakeBatch) -> TrainBatch:
    return make_batch(
        [make_traj("a", 0, [1, 4, 5], [6, 7, 8, 9, 2])],
        [make_traj("b", 0, [1, 12], [13, 2], reward=5.0, logprobs=[-9.0, -9.0])],
        [make_traj("c", 0, [1, 4, 5, 6, 7, 8], [10, 11, 12, 13, 4, 5, 6, 2])],
    )


@pytest.mark.parametrize("budget", [1, 64])
def test_mean_nll_per_loss_token(
    tiny_model: PreTrainedModel, batch: TrainBatch, budget: int
) -> None:
    # budget 1: every row is its own micro-batch; 64: rows padded together
    total, count = reference_nll(tiny_model, batch.trajectories)
    metrics = make_trainer(tiny_model, budget).validation_loss(batch)
    assert set(metrics) == {"val/loss", "val/ppl", "val/tokens"}
    assert metrics["val/tokens"] == count == 15
    assert metrics["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # an untrained model over a ~16-token vocabulary is close to uniform
    assert 1.5 < metrics["val/loss"] < 4.0


def test_model_mode_grads_and_weights_are_untouched(
    tiny_model: PreTrainedModel, batch: TrainBatch
) -> None:
    trainer = make_trainer(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.train()
    first = trainer.validation_loss(batch)
    assert tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())
    tiny_model.train(False)
    assert trainer.validation_loss(batch) == first  # deterministic: dropout was off both times
    assert not tiny_model.training
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_training_step_lowers_it(tiny_model: PreTrainedModel, batch: TrainBatch) -> None:
    trainer = make_trainer(tiny_model)
    start = trainer.validation_loss(batch)["val/loss"]
    for _ in range(3):
        trainer.step(batch)
    assert trainer.validation_loss(batch)["val/loss"] < start - 0.1


def test_failed_trajectories_are_skipped(
    tiny_model: PreTrainedModel, batch: TrainBatch, make_traj: MakeTraj, make_batch: MakeBatch
) -> None:
    trainer = make_trainer(tiny_model)
    bad = msgspec.structs.replace(
        make_traj("d", 0, [1, 4], [99999]),  # would not even embed
        status=Status.FAILED,
        failure=FailureReason.BAD_ITEM,
    )
    with_bad = make_batch(*[g.trajectories for g in batch.groups], [bad])
    assert trainer.validation_loss(with_bad) == trainer.validation_loss(batch)
    only_bad = trainer.validation_loss(make_batch([bad]))
    assert only_bad["val/tokens"] == 0.0
    assert math.isnan(only_bad["val/loss"])
    assert math.isnan(only_bad["val/ppl"])


def test_no_loss_tokens_gives_nan(
    tiny_model: PreTrainedModel, make_traj: MakeTraj, make_batch: MakeBatch
) -> None:
    trainer = make_trainer(tiny_model)
    empty = trainer.validation_loss(TrainBatch(step=0, groups=[]))
    assert empty["val/tokens"] == 0.0
    assert math.isnan(empty["val/loss"])
    traj = make_traj("a", 0, [1, 4, 5], [6])
    prompt_only = msgspec.structs.replace(traj, turns=traj.turns[:1])
    metrics = trainer.validation_loss(make_batch([prompt_only]))
    assert metrics["val/tokens"] == 0.0
    assert math.isnan(metrics["val/loss"])


def test_torch_failures_are_train_errors(
    tiny_model: PreTrainedModel, make_traj: MakeTraj, make_batch: MakeBatch
) -> None:
    batch = make_batch([make_traj("a", 0, [1, 4], [99999, 2])])  # id beyond the vocabulary
    with pytest.raises(TrainError, match="validation loss"):
        make_trainer(tiny_model).validation_loss(batch)
