"""Padding-free forward: packing rows, the attention each mechanism gets, and exactness."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_train import tiny_policy
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel

from nexrl_async.train.packing import (
    Mechanism,
    PackedRows,
    attention_mechanism,
    block_causal_mask,
    pack_rows,
    packed_logits,
    packed_model_inputs,
    unpack,
)

CPU = torch.device("cpu")
LENGTHS = [5, 1, 9, 3, 1]
VARLEN_NAME = "test_flash_varlen"
"""A pure-torch stand-in for flash-attn varlen ("flash" in the name routes it like one)."""


def _tiny(architecture: str = "qwen2", attn: str = "sdpa", **config: Any) -> PreTrainedModel:
    model = tiny_policy(architecture, attn)
    for key, value in config.items():
        setattr(model.config, key, value)
    return model


def _rows(lengths: list[int], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded ``[b, W]`` random ids (pad 0) and their lengths."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    ids = torch.randint(3, 14, (len(lengths), max(lengths)), generator=gen)  # vocabulary 14
    return ids * (torch.arange(ids.shape[1])[None] < lens[:, None]), lens


def _padded_logits(model: PreTrainedModel, ids: Tensor, lens: Tensor) -> Tensor:
    mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
    with torch.no_grad():
        logits: Tensor = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits


def _assert_rows_match(packed: Tensor, padded: Tensor, rows: PackedRows) -> None:
    starts = rows.cu_seqlens.tolist()
    for r, n in enumerate(rows.lengths.tolist()):
        torch.testing.assert_close(packed[0, starts[r] : starts[r] + n], padded[r, :n])


def test_pack_rows_concatenates_and_restarts_positions() -> None:
    ids, lens = _rows([3, 1, 2])
    rows = pack_rows(ids, lens, CPU)
    assert rows.total == 6
    assert rows.max_length == 3
    assert rows.input_ids[0].tolist() == [*ids[0, :3].tolist(), ids[1, 0], *ids[2, :2].tolist()]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert rows.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert rows.cu_seqlens.dtype == torch.int32
    assert rows.predicted.tolist() == [[False, True, True], [False] * 3, [False, True, False]]
    values = torch.arange(10.0, 16.0)[None]
    assert unpack(values, rows).tolist() == [[0, 11, 12], [0, 0, 0], [0, 15, 0]]


@pytest.mark.parametrize(
    ("ids", "lens"),
    [
        (torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 0])),
        (torch.ones(2, 3, dtype=torch.long), torch.tensor([4, 1])),
        (torch.ones(3, dtype=torch.long), torch.tensor([3])),
        (torch.ones(0, 3, dtype=torch.long), torch.tensor([], dtype=torch.long)),
    ],
)
def test_pack_rows_refuses_bad_rows(ids: Tensor, lens: Tensor) -> None:
    with pytest.raises(ValueError):
        pack_rows(ids, lens, CPU)


def test_unpack_sends_gradients_only_to_tokens_with_a_logprob() -> None:
    rows = pack_rows(*_rows([2, 3]), CPU)
    values = torch.zeros(1, rows.total, requires_grad=True)
    unpack(values, rows).sum().backward()
    assert values.grad is not None
    assert values.grad.tolist() == [[0, 1, 0, 1, 1]]  # each row's first token has none


def test_block_causal_mask_is_same_row_and_causal() -> None:
    rows = pack_rows(*_rows([2, 1, 3]), CPU)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    mask = block_causal_mask(rows)
    assert mask.shape == (1, 1, 6, 6)
    assert torch.equal(mask[0, 0], expected)
    windowed = block_causal_mask(rows, window=2)[0, 0]
    assert torch.equal(windowed, expected & ~torch.eye(6, dtype=torch.bool).roll(-2, 1).tril())
    additive = block_causal_mask(rows, dtype=torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected)
    assert float(additive.min()) == torch.finfo(torch.float32).min


@pytest.mark.parametrize(
    ("name", "mechanism"),
    [
        ("flash_attention_2", "varlen"),
        ("flash_attention_3", "varlen"),
        ("kernels-community/flash-attn2", "varlen"),
        ("sdpa", "mask"),
        ("eager", "mask"),
        ("flex_attention", "positions"),
    ],
)
def test_mechanism_follows_the_attention_implementation(name: str, mechanism: str) -> None:
    assert attention_mechanism(name) == mechanism


@pytest.fixture
def varlen_attention() -> Iterator[list[dict[str, Any]]]:
    """Register the stand-in; yields the keyword arguments of each of its calls."""
    calls: list[dict[str, Any]] = []

    def attend(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        calls.append({"attention_mask": attention_mask, **kwargs})
        bounds = kwargs["cu_seq_lens_q"].tolist()  # KeyError: the kwargs did not arrive
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        parts = [
            F.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
            )
            for a, b in itertools.pairwise(bounds)
        ]
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None

    AttentionInterface.register(VARLEN_NAME, attend)
    yield calls
    AttentionInterface._global_mapping.pop(VARLEN_NAME, None)


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_varlen_kwargs_reach_every_attention_layer(
    varlen_attention: list[dict[str, Any]], architecture: str
) -> None:
    model = _tiny(architecture)
    ids, lens = _rows(LENGTHS)
    expected = _padded_logits(model, ids, lens)
    # set_attn_implementation would look for a real flash kernel; the config is what layers read
    model.config._attn_implementation = VARLEN_NAME
    rows = pack_rows(ids, lens, CPU)
    with torch.no_grad():
        logits = packed_logits(model, rows)
    assert len(varlen_attention) == model.config.num_hidden_layers
    for call in varlen_attention:
        assert call["attention_mask"] is None
        assert (
            call["cu_seq_lens_q"].tolist()
            == call["cu_seq_lens_k"].tolist()
            == [
                0,
                5,
                6,
                15,
                18,
                19,
            ]
        )
        assert call["max_length_q"] == call["max_length_k"] == 9
    _assert_rows_match(logits, expected, rows)


@pytest.mark.parametrize(
    ("architecture", "attn", "mechanism"),
    [
        ("qwen2", "sdpa", "mask"),
        ("qwen2", "eager", "mask"),
        ("llama", "sdpa", "mask"),
        ("llama", "eager", "mask"),
        ("qwen2", "sdpa", "positions"),
        ("llama", "eager", "positions"),
    ],
)
def test_packed_logits_equal_padded_ones(
    architecture: str, attn: str, mechanism: Mechanism
) -> None:
    model = _tiny(architecture, attn)
    ids, lens = _rows(LENGTHS, seed=1)
    rows = pack_rows(ids, lens, CPU)
    with torch.no_grad():
        logits = model(**packed_model_inputs(model, rows, mechanism=mechanism)).logits
    _assert_rows_match(logits, _padded_logits(model, ids, lens), rows)


def test_a_plain_causal_mask_would_leak_across_rows() -> None:
    # the exactness test above can fail: without the block mask rows see each other
    model = _tiny()
    ids, lens = _rows(LENGTHS, seed=1)
    rows = pack_rows(ids, lens, CPU)
    with torch.no_grad():
        leaky = model(input_ids=rows.input_ids, position_ids=rows.position_ids).logits
    with pytest.raises(AssertionError):
        _assert_rows_match(leaky, _padded_logits(model, ids, lens), rows)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_window_layers_get_their_own_mask(attn: str) -> None:
    model = _tiny("qwen2", attn)
    model.config.sliding_window = 3
    model.config.layer_types = ["full_attention", "sliding_attention"]
    model.model.has_sliding_layers = True
    ids, lens = _rows(LENGTHS, seed=2)
    rows = pack_rows(ids, lens, CPU)
    inputs = packed_model_inputs(model, rows)
    assert set(inputs["attention_mask"]) == {"full_attention", "sliding_attention"}
    with torch.no_grad():
        logits = model(**inputs).logits
    _assert_rows_match(logits, _padded_logits(model, ids, lens), rows)
