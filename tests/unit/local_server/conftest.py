"""A tiny model and tokenizer in memory for the local server's unit tests (one torch thread)."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.train.build import build_char_tokenizer, build_model_for

TINY = BuiltModel(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_char_tokenizer(CharTokenizer(alphabet="0123456789+= "))


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    built = build_model_for(TINY, tokenizer, seed=0)
    with torch.no_grad():
        for param in built.parameters():
            if param.dim() > 1:
                param.mul_(25.0)
    return built
