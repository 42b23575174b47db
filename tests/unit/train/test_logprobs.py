from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedModel

from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.logprobs import batch_logprobs
from nexrl_async.train.tensors import SequenceBatch, sequences_from_batch


@pytest.fixture
def seq(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> SequenceBatch:
    return sequences_from_batch(
        make_batch(
            [make_traj("a", 0, [1, 4, 5], [6, 7, 8, 9, 2]), make_traj("a", 1, [1, 4, 5], [6, 2])],
            [make_traj("b", 0, [1, 12], [13, 11, 10, 2, 5, 6, 7])],
        ),
        pad_token_id=0,
    )


def _direct(model: PreTrainedModel, ids: list[int], temperature: float) -> list[float]:
    """log p(x_t | x_<t) for t >= 1, one unpadded sequence, straight from log_softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0] / temperature
    logp = torch.log_softmax(logits.double(), dim=-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("budget", [1, 12, 10_000])
def test_logprob_of_token_t_comes_from_the_logits_at_t_minus_1(
    tiny_model: PreTrainedModel, seq: SequenceBatch, temperature: float, budget: int
) -> None:
    logprobs, entropy = batch_logprobs(
        tiny_model, seq, token_budget=budget, temperature=temperature, with_entropy=True
    )
    assert logprobs.shape == seq.input_ids.shape
    assert entropy is not None
    for row in range(seq.size):
        n = int(seq.lengths[row])
        ids = seq.input_ids[row, :n].tolist()
        expected = torch.tensor([0.0, *_direct(tiny_model, ids, temperature)], dtype=torch.float64)
        torch.testing.assert_close(logprobs[row, :n].double(), expected, atol=1e-5, rtol=0)
        assert logprobs[row, n:].abs().sum() == 0  # padding holds 0
        assert entropy[row, 0] == 0
        assert bool((entropy[row, 1:n] > 0).all())


def test_entropy_is_that_of_the_scaled_distribution_that_drew_the_token(
    tiny_model: PreTrainedModel, seq: SequenceBatch
) -> None:
    _, entropy = batch_logprobs(
        tiny_model, seq, token_budget=100, temperature=0.5, with_entropy=True
    )
    assert entropy is not None
    ids = seq.input_ids[2, : int(seq.lengths[2])]
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(input_ids=ids[None]).logits[0] / 0.5, dim=-1)
    expected = -(logp.exp() * logp).sum(-1)[:-1]
    torch.testing.assert_close(entropy[2, 1 : len(ids)], expected, atol=1e-5, rtol=0)


def test_batch_logprobs_restores_train_mode(
    tiny_model: PreTrainedModel, seq: SequenceBatch
) -> None:
    tiny_model.train()
    batch_logprobs(tiny_model, seq, token_budget=100, temperature=1.0)
    assert tiny_model.training
