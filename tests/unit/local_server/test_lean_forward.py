"""The lean Llama / Qwen2 forward computes what transformers computes, on the same batch."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from nexrl_async.config.model import BuiltModel
from nexrl_async.inference.local.batch import DecodeBatch
from nexrl_async.inference.local.lean_forward import (
    Forward,
    HFForward,
    LeanForward,
    forward_for,
    lean_supported,
)
from nexrl_async.train.build import build_model_for


def _model(tokenizer: PreTrainedTokenizerFast, architecture: str, kv_heads: int) -> PreTrainedModel:
    config = BuiltModel(
        architecture=architecture,  # type: ignore[arg-type]
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads,
    )  # fmt: skip
    model = build_model_for(config, tokenizer, seed=0)  # fmt: skip
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)  # biases and norms away from 0 and 1
    return model


def _run(forward: Forward) -> list[torch.Tensor]:
    """Ragged prefill with prompt logits, decode, a join, a leave: every logits tensor."""
    gen = torch.Generator().manual_seed(0)
    seen = []
    with torch.inference_mode():
        first = DecodeBatch.prefill(forward, [[1, 5, 6, 7], [1, 8], [1, 5, 6, 7]], all_logits=True)
        batch = first.batch
        assert first.all_logits is not None
        seen += [first.all_logits[:, -2:], first.last_logits]
        for step in range(4):
            batch.last = torch.randint(4, 16, (batch.size,), generator=gen)
            seen.append(batch.decode(forward))
            if step == 1:
                batch.extend(
                    DecodeBatch.prefill(forward, [[1, 9, 9, 9, 9, 9, 9]], all_logits=False).batch
                )
            if step == 2:
                batch.select([1, 3])
    return seen


@pytest.mark.parametrize(("architecture", "kv_heads"), [("qwen2", 4), ("qwen2", 2), ("llama", 1)])
def test_lean_matches_transformers(
    tokenizer: PreTrainedTokenizerFast, architecture: str, kv_heads: int
) -> None:
    model = _model(tokenizer, architecture, kv_heads)
    assert lean_supported(model)
    assert isinstance(forward_for(model), LeanForward)
    for lean, ref in zip(_run(LeanForward(model)), _run(HFForward(model)), strict=True):
        assert lean.shape == ref.shape
        assert torch.isfinite(lean).all()
        assert torch.allclose(lean, ref, atol=1e-4, rtol=1e-4), (lean - ref).abs().max()


def test_other_models_keep_the_transformers_forward(tokenizer: PreTrainedTokenizerFast) -> None:
    model = _model(tokenizer, "llama", 4)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    assert not lean_supported(model)
    assert isinstance(forward_for(model), HFForward)
    assert isinstance(forward_for(_model(tokenizer, "qwen2", 4), lean=False), HFForward)
