"""DPO steps of the trainer: ln 2 at step 0, the exact DPO gradient in two passes, validation.

The gradient check trains one step through the trainer (rows spread over several micro-batches)
and the same step by hand: one forward of the whole batch with gradients, the DPO loss of its
sequence log-probs, ``backward``, the same AdamW step. The parameters must agree.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import msgspec
import pytest
import torch

from nexrl_async.algorithms import dpo_loss
from nexrl_async.config.training import AlgorithmConfig, DPOConfig, OptimConfig
from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.dpo import REF_LOGPROB_METRIC
from nexrl_async.train.logprobs import forward_logprobs
from nexrl_async.train.microbatch import collate
from nexrl_async.train.tensors import sequences_from_batch
from nexrl_async.train.trainer import Trainer

LN2 = math.log(2)
PAIRS = [  # (prompt, chosen, rejected): ragged, token ids < 14 (the char vocabulary)
    ([1, 4, 5], [5, 4, 2], [4, 5, 2]),
    ([1, 7, 8, 9], [9, 8, 7, 2], [9, 8, 6, 2]),
    ([1, 3], [3, 2], [3, 3, 3, 3, 3, 2]),
]


@pytest.fixture
def pairs(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> TrainBatch:
    groups = [
        # the rejected first in one group: rows follow trajectory order, roles sample indices
        [make_traj(f"p{i}", 1, prompt, rejected), make_traj(f"p{i}", 0, prompt, chosen)]
        if i == 1
        else [make_traj(f"p{i}", 0, prompt, chosen), make_traj(f"p{i}", 1, prompt, rejected)]
        for i, (prompt, chosen, rejected) in enumerate(PAIRS)
    ]
    return make_batch(*groups)


def _dpo(**dpo: object) -> AlgorithmConfig:
    return AlgorithmConfig(mode="dpo", dpo=DPOConfig(**dpo))  # type: ignore[arg-type]


OPTIM = OptimConfig(lr=0.5, eps=1.0, max_grad_norm=None)  # eps = 1: the step follows the gradient


def test_step_zero_loss_is_ln2_and_the_update_is_the_dpo_gradient(
    make_trainer: Callable[..., Trainer], pairs: TrainBatch
) -> None:
    trainer = make_trainer(algorithm=_dpo(beta=0.5), optim=OPTIM)
    assert trainer.reference is not None
    model = copy.deepcopy(trainer.model)
    reference = copy.deepcopy(trainer.model)

    metrics = trainer.step(pairs)
    assert abs(metrics["train/loss"] - LN2) < 1e-9
    assert metrics["train/pairs"] == 3.0
    assert metrics["train/preference_accuracy"] == 0.0
    assert metrics["train/reward_margin"] == 0.0

    seq = sequences_from_batch(pairs, pad_token_id=trainer.pad_token_id)
    whole = collate(seq, range(seq.size), torch.device("cpu"), packing=False)
    chosen, rejected = torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5])
    model.train()
    logprobs, _ = forward_logprobs(model, whole, temperature=1.0, with_entropy=False)
    with torch.no_grad():
        ref, _ = forward_logprobs(reference, whole, temperature=1.0, with_entropy=False)
    s = (logprobs * seq.loss_mask).sum(-1)
    s_ref = (ref * seq.loss_mask).sum(-1)
    loss, _ = dpo_loss(s[chosen], s[rejected], s_ref[chosen], s_ref[rejected], beta=0.5)
    assert float(loss.detach()) == pytest.approx(LN2, abs=1e-6)
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, eps=1.0, weight_decay=0.0)
    optimizer.step()
    moved = 0.0
    for (name, got), (_, expected) in zip(
        trainer.model.named_parameters(), model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=name)
        moved = max(moved, float((expected - dict(reference.named_parameters())[name]).abs().max()))
    assert moved > 1e-3


def test_dpo_learns_the_pairs_and_validation_reports_it(
    make_trainer: Callable[..., Trainer], pairs: TrainBatch
) -> None:
    trainer = make_trainer(algorithm=_dpo(beta=0.5), optim=OptimConfig(lr=1e-2))
    before = trainer.validation_loss(pairs)
    assert before["val/loss"] == pytest.approx(LN2, abs=1e-6)
    assert before["val/preference_accuracy"] == 0.0
    losses = [trainer.step(pairs)["train/loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05
    after = trainer.validation_loss(pairs)
    assert after["val/preference_accuracy"] == 1.0
    assert after["val/reward_margin"] > 0
    assert after["val/loss"] < LN2 - 0.05
    assert after["val/pairs"] == 3.0


def test_ipo_and_length_norm_variants_train(
    make_trainer: Callable[..., Trainer], pairs: TrainBatch
) -> None:
    for dpo in ({"loss": "ipo", "beta": 0.5}, {"length_norm": True}):
        trainer = make_trainer(algorithm=_dpo(**dpo), optim=OptimConfig(lr=1e-2))
        first = trainer.step(pairs)["train/loss"]
        if dpo.get("loss") == "ipo":
            assert first == pytest.approx(1.0, abs=1e-9)  # 1 / (4 beta^2) at h = 0
        later = [trainer.step(pairs)["train/loss"] for _ in range(4)]
        assert later[-1] < first


def test_reference_log_probs_from_the_data(
    make_trainer: Callable[..., Trainer], pairs: TrainBatch
) -> None:
    refs = {0: -1.0, 1: -3.0}  # chosen, rejected: h = (s_c + 1) - (s_r + 3) at step 0
    groups = [
        msgspec.structs.replace(
            g,
            trajectories=[
                msgspec.structs.replace(t, metrics={REF_LOGPROB_METRIC: refs[t.sample_index]})
                for t in g.trajectories
            ],
        )
        for g in pairs.groups
    ]
    batch = msgspec.structs.replace(pairs, groups=groups)
    trainer = make_trainer(algorithm=_dpo(reference="data", beta=0.1))
    assert trainer.reference is None
    seq = sequences_from_batch(batch, pad_token_id=trainer.pad_token_id)
    logprobs, _ = trainer._logprobs(trainer.model, seq, with_entropy=False)
    s = (logprobs.double() * seq.loss_mask).sum(-1)
    chosen, rejected = torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5])
    expected, _ = dpo_loss(
        s[chosen], s[rejected], torch.full((3,), -1.0), torch.full((3,), -3.0), beta=0.1
    )
    metrics = trainer.step(batch)
    assert metrics["train/loss"] == pytest.approx(float(expected), abs=1e-6)
    assert metrics["train/loss"] != pytest.approx(LN2, abs=1e-3)
    with pytest.raises(TrainError, match="ref_chosen_logprob"):
        trainer.step(pairs)  # no reference log-probs in these items


def test_a_group_that_is_not_a_pair_is_refused(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
) -> None:
    trainer = make_trainer(algorithm=_dpo())
    batch = make_batch([make_traj("g", i, [1, 4], [5, 2]) for i in range(3)])
    with pytest.raises(TrainError, match=r"group g holds samples \[0, 1, 2\], not a preference"):
        trainer.step(batch)
