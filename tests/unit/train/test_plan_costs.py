"""The cost model a model's attention gives the planner, and the layouts the trainer then runs."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train import packing
from nexrl_async.train.build import build_char_tokenizer, build_model
from nexrl_async.train.logprobs import batch_logprobs
from nexrl_async.train.microbatch import micro_batches
from nexrl_async.train.packing import (
    FORWARD_FLOPS_PER_LAYER,
    SOFTMAX_FLOPS,
    PackedRows,
    plan_costs,
)
from nexrl_async.train.ranks.lockstep import rank_logprobs
from nexrl_async.train.tensors import SequenceBatch, sequences_from_batch

CPU = torch.device("cpu")


def _model(*, tied: bool) -> PreTrainedModel:
    tok = build_char_tokenizer(CharTokenizer())
    cfg = BuiltModel(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return build_model(
        cfg, vocab_size=len(tok), seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )


@pytest.fixture
def short_rows(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> SequenceBatch:
    """The demo's shape: 8 groups of 8 rows, a 4-token prompt and 1-3 response tokens."""
    rng = random.Random(0)
    groups = []
    for g in range(8):
        prompt = [1, 4 + g, 5, 3]
        groups.append(
            [make_traj(f"g{g}", i, prompt, [6] * rng.randint(1, 3), reward=i / 8) for i in range(8)]
        )
    return sequences_from_batch(make_batch(*groups), pad_token_id=0)


@pytest.mark.parametrize("tied", [True, False])
def test_a_masked_model_costs_flops_per_slot_pair_and_forward(tied: bool) -> None:
    model = _model(tied=tied)
    costs = plan_costs(model)
    assert costs is not None
    assert costs.dense
    total = sum(p.numel() for p in model.parameters())
    embedding = 32 * model.config.vocab_size  # hidden x vocab
    assert costs.token == 2.0 * (total if tied else total - embedding)
    assert costs.pair == 3 * 4 * (4.0 * 8 + SOFTMAX_FLOPS)  # layers x heads x (head_dim 8)
    assert costs.forward == 3 * FORWARD_FLOPS_PER_LAYER


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention"])
def test_models_that_pack_without_a_dense_mask_always_pack(attn: str) -> None:
    model = _model(tied=True)
    model.config._attn_implementation = attn  # what the packed forward reads
    assert plan_costs(model) is None


def test_short_rows_under_sdpa_run_padded_and_give_the_packed_log_probs(
    tiny_model: PreTrainedModel, short_rows: SequenceBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    costs = plan_costs(tiny_model)
    planned = list(
        micro_batches(
            short_rows, range(short_rows.size), token_budget=8192, device=CPU, costs=costs
        )
    )
    assert len(planned) == 1
    assert planned[0].packed is None
    masks: list[int] = []
    original = packing.block_causal_mask

    def recorded(rows: PackedRows, **kwargs: Any) -> torch.Tensor:
        masks.append(rows.total)
        return original(rows, **kwargs)

    monkeypatch.setattr(packing, "block_causal_mask", recorded)
    auto, _ = rank_logprobs(
        tiny_model, short_rows, rank=0, world_size=1, token_budget=8192, temperature=1.0,
        packing=True,
    )  # fmt: skip
    assert masks == []  # the trainer's pre-pass built no dense [N, N] mask
    packed, _ = batch_logprobs(tiny_model, short_rows, token_budget=8192, temperature=1.0)
    assert masks == [int(short_rows.lengths.sum())]  # without a cost model: one packed forward
    torch.testing.assert_close(auto, packed, atol=1e-5, rtol=0)
