"""Packed and padded micro-batches give the same log-probs, entropies and gradients.

A tiny fp32 Qwen2 on CPU; ragged rows (one of a single token) spread over micro-batches of
several rows by small token budgets.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from transformers import PreTrainedModel

from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.logprobs import batch_logprobs, forward_logprobs
from nexrl_async.train.microbatch import micro_batches, split_minibatches
from nexrl_async.train.tensors import SequenceBatch, sequences_from_batch

CPU = torch.device("cpu")
ATOL = 1e-5


@pytest.fixture
def seq(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> SequenceBatch:
    rows = [  # (prompt, response): lengths 8, 1, 4, 12, 2, 7 | 3, 9
        ([1, 4, 5], [6, 7, 8, 9, 2]),
        ([1], []),
        ([1, 4], [4, 2]),
        ([1, 4], [13, 11, 10, 2, 5, 6, 7, 8, 9, 2]),
        ([1], [3]),
        ([1, 4], [5] * 5),
        ([1, 12], [13]),
        ([1, 12, 4], [5, 6, 7, 8, 9, 2]),
    ]
    trajs = [make_traj("ab"[i // 6], i, p, r) for i, (p, r) in enumerate(rows)]
    return sequences_from_batch(make_batch(trajs[:6], trajs[6:]), pad_token_id=0)


def test_the_batch_is_ragged_with_a_single_token_row(seq: SequenceBatch) -> None:
    assert seq.lengths.tolist() == [8, 1, 4, 12, 2, 7, 3, 9]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("budget", [1, 12, 16, 25, 10_000])
def test_packed_logprobs_and_entropies_equal_padded_ones(
    tiny_model: PreTrainedModel, seq: SequenceBatch, budget: int, temperature: float
) -> None:
    packed, packed_ent = batch_logprobs(
        tiny_model, seq, token_budget=budget, temperature=temperature, with_entropy=True
    )
    padded, padded_ent = batch_logprobs(
        tiny_model,
        seq,
        token_budget=budget,
        temperature=temperature,
        with_entropy=True,
        packing=False,
    )
    assert packed_ent is not None
    assert padded_ent is not None
    torch.testing.assert_close(packed, padded, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed_ent, padded_ent, atol=ATOL, rtol=0)
    beyond = torch.arange(seq.width)[None] >= seq.lengths[:, None]
    assert not packed[beyond].any()
    assert not packed[:, 0].any()
    assert bool((packed_ent[:, 1:][~beyond[:, 1:]] > 0).all())


def test_packed_logprobs_equal_one_unpadded_forward_per_row(
    tiny_model: PreTrainedModel, seq: SequenceBatch
) -> None:
    logprobs, _ = batch_logprobs(tiny_model, seq, token_budget=25, temperature=1.0)
    for row, n in enumerate(seq.lengths.tolist()):
        ids = seq.input_ids[row, :n]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(input_ids=ids[None]).logits[0].double(), dim=-1)
        expected = [0.0] + [float(logp[t - 1, ids[t]]) for t in range(1, n)]
        expected_t = torch.tensor(expected, dtype=torch.float64)
        torch.testing.assert_close(logprobs[row, :n].double(), expected_t, atol=ATOL, rtol=0)


def test_micro_batches_hold_several_rows_and_split_the_batch(seq: SequenceBatch) -> None:
    mbs = list(micro_batches(seq, range(seq.size), token_budget=16, device=CPU))
    assert len(mbs) > 1
    assert any(len(mb.rows) > 2 for mb in mbs)
    assert sorted(r for mb in mbs for r in mb.rows.tolist()) == list(range(seq.size))
    assert all(mb.packed is not None and mb.packed.total <= 16 for mb in mbs)


def _gradients(
    model: PreTrainedModel, seq: SequenceBatch, weights: Tensor, *, budget: int, packing: bool
) -> dict[str, Tensor]:
    """Gradients of ``Σ w · (log p + 0.1 · H) / tokens`` accumulated over micro-batches."""
    model.zero_grad(set_to_none=True)
    tokens = float(seq.loss_mask.sum())
    for rows in split_minibatches(seq.size, 2):
        for mb in micro_batches(seq, rows, token_budget=budget, device=CPU, packing=packing):
            logprobs, entropy = forward_logprobs(model, mb, temperature=0.8, with_entropy=True)
            assert entropy is not None
            w = mb.take(weights * seq.loss_mask)
            ((w * (logprobs + 0.1 * entropy)).sum() / tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("budget", [1, 16, 10_000])
def test_packed_gradients_equal_padded_ones(
    tiny_model: PreTrainedModel, seq: SequenceBatch, budget: int
) -> None:
    weights = torch.randn(seq.input_ids.shape, generator=torch.Generator().manual_seed(0))
    tiny_model.train()
    packed = _gradients(tiny_model, seq, weights, budget=budget, packing=True)
    padded = _gradients(tiny_model, seq, weights, budget=budget, packing=False)
    assert packed.keys() == padded.keys()
    assert len(packed) == len(list(tiny_model.parameters()))
    for name, grad in packed.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, padded[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_logprobs_on_cuda_match_padded_ones(
    tiny_model: PreTrainedModel, seq: SequenceBatch, attn: str
) -> None:
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    model = tiny_model.to(device="cuda", dtype=torch.float16)
    padded, _ = batch_logprobs(model, seq, token_budget=16, temperature=1.0, packing=False)
    model.set_attn_implementation(attn)  # flash: varlen through cu_seq_lens
    packed, _ = batch_logprobs(model, seq, token_budget=16, temperature=1.0)
    # fp16 kernels differ in rounding only; a row attending to another is off by ~0.1
    torch.testing.assert_close(packed, padded, atol=1e-2, rtol=0)
