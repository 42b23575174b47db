"""Gradient accumulation over micro-batches must equal one pass over the whole minibatch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedModel

from nexrl_async.config.training import AlgorithmConfig, KLConfig
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.logprobs import batch_logprobs
from nexrl_async.train.loss import MicroLoss, RLLoss, SFTLoss
from nexrl_async.train.step import Tally, accumulate_gradients
from nexrl_async.train.targets import UpdateTargets
from nexrl_async.train.tensors import SequenceBatch, sequences_from_batch

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture
def seq(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> SequenceBatch:
    return sequences_from_batch(
        make_batch(
            [
                make_traj("a", 0, [1, 4, 5], [6, 7, 8, 9, 2]),
                make_traj("a", 1, [1, 4, 5], [6, 2]),
                make_traj("a", 2, [1, 4, 5], [10, 11, 12, 13, 4, 5, 6, 2]),
            ],
            [make_traj("b", 0, [1, 12], [13, 2]), make_traj("b", 1, [1, 12], [2])],
        ),
        pad_token_id=0,
    )


def _rl_loss(model: PreTrainedModel, seq: SequenceBatch, mode: str) -> RLLoss:
    gen = torch.Generator().manual_seed(1)
    logprobs, _ = batch_logprobs(model, seq, token_budget=1000, temperature=1.0)
    noise = 0.3 * torch.randn(seq.input_ids.shape, generator=gen)
    targets = UpdateTargets(
        loss_mask=seq.loss_mask,
        advantages=torch.randn(seq.input_ids.shape, generator=gen),
        old_logprobs=logprobs + noise,  # ratios away from 1: some tokens clip
        ref_logprobs=logprobs - noise,
    )
    algo = AlgorithmConfig(
        loss_agg=mode,  # type: ignore[arg-type]
        kl=KLConfig(placement="loss", kind="k3"),
        entropy_coef=0.01,
        dual_clip_c=3.0,
    )
    return RLLoss(algo=algo, targets=targets, temperature=0.9, kl_coef=0.1, norm_constant=8.0)


def _grads(
    model: PreTrainedModel, seq: SequenceBatch, loss_fn: MicroLoss, rows: list[int], budget: int
) -> tuple[float, dict[str, torch.Tensor], Tally]:
    model.zero_grad(set_to_none=True)
    tally = Tally()
    loss = accumulate_gradients(model, seq, rows, loss_fn, token_budget=budget, tally=tally)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads, tally


def _assert_same(
    a: tuple[float, dict[str, torch.Tensor], Tally], b: tuple[float, dict[str, torch.Tensor], Tally]
) -> None:
    assert a[0] == pytest.approx(b[0], abs=1e-6)
    assert a[1].keys() == b[1].keys()
    assert a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_rl_micro_batches_accumulate_to_the_full_batch(
    tiny_model: PreTrainedModel, seq: SequenceBatch, mode: str
) -> None:
    loss_fn = _rl_loss(tiny_model, seq, mode)
    rows = list(range(seq.size))
    full = _grads(tiny_model, seq, loss_fn, rows, budget=10_000)
    split = _grads(tiny_model, seq, loss_fn, rows, budget=1)  # one row per micro-batch
    assert len(split[2].sums)
    assert full[2].tokens == split[2].tokens == 18
    _assert_same(full, split)
    assert full[2].weighted["clip_frac_high"] + full[2].weighted["clip_frac_low"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_sft_micro_batches_accumulate_to_the_full_batch(
    tiny_model: PreTrainedModel, seq: SequenceBatch, mode: str
) -> None:
    loss_fn = SFTLoss(loss_mask=seq.loss_mask, agg=mode, norm_constant=8.0)  # type: ignore[arg-type]
    rows = [0, 2, 3]
    _assert_same(
        _grads(tiny_model, seq, loss_fn, rows, budget=10_000),
        _grads(tiny_model, seq, loss_fn, rows, budget=9),
    )


def test_the_full_batch_loss_is_the_plain_formula(
    tiny_model: PreTrainedModel, seq: SequenceBatch
) -> None:
    """token-mean SFT: the accumulated loss is -sum(m · logp) / sum(m) over the rows."""
    loss_fn = SFTLoss(loss_mask=seq.loss_mask, agg="token-mean", norm_constant=8.0)
    loss, _, _ = _grads(tiny_model, seq, loss_fn, [0, 1, 2, 3, 4], budget=3)
    logprobs, _ = batch_logprobs(tiny_model, seq, token_budget=1000, temperature=1.0)
    expected = -(logprobs * seq.loss_mask).sum() / seq.loss_mask.sum()
    assert loss == pytest.approx(float(expected), abs=1e-6)
