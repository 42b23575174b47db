"""Tiny models and batches for the trainer tests, shared by the unit and integration conftests
(which import these fixtures; ``tests/support`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from transformers import PreTrainedModel

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionToken
from nexrl_async.train.build import build_char_tokenizer, build_model, build_model_for

TOKEN = VersionToken(lease_id=0, version=0)
TINY = BuiltModel(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny_policy(architecture: str = "qwen2", attn: str = "sdpa") -> PreTrainedModel:
    """A 2-layer model with grouped-query attention (4 heads, 2 of them for keys and values)
    built from seed 0, for exactness tests of the forward's layouts."""
    tok = build_char_tokenizer(CharTokenizer())
    return build_model(
        BuiltModel(
            architecture=architecture,  # type: ignore[arg-type]
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation=attn,  # type: ignore[arg-type]
        ),
        vocab_size=len(tok),
        seed=0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_model() -> PreTrainedModel:
    tok = build_char_tokenizer(CharTokenizer())
    return build_model_for(TINY, tok, seed=0)


def _traj(
    group: str,
    index: int,
    prompt: Sequence[int],
    response: Sequence[int],
    *,
    reward: float = 0.0,
    logprobs: Sequence[float] | None = None,
) -> Trajectory:
    """A single-turn trajectory: a user prompt, then one assistant response."""
    return Trajectory(
        group_id=group,
        item_key=group,
        sample_index=index,
        token=TOKEN,
        reward=reward,
        turns=[
            Turn(role="user", token_ids=list(prompt), loss_mask=[0] * len(prompt)),
            Turn(
                role="assistant",
                token_ids=list(response),
                loss_mask=[1] * len(response),
                logprobs=None if logprobs is None else list(logprobs),
            ),
        ],
    )


def _batch(*groups: Sequence[Trajectory], step: int = 0) -> TrainBatch:
    """A batch with one group per argument (group ids taken from the trajectories)."""
    return TrainBatch(
        step=step,
        groups=[
            Group(group_id=g[0].group_id, item_key=g[0].item_key, token=TOKEN, trajectories=list(g))
            for g in groups
        ],
    )


@pytest.fixture
def make_traj() -> Callable[..., Trajectory]:
    """``make_traj(group, index, prompt, response, reward=..., logprobs=...)``."""
    return _traj


@pytest.fixture
def make_batch() -> Callable[..., TrainBatch]:
    """``make_batch([traj, ...], [traj, ...], step=0)``: one group per list."""
    return _batch
