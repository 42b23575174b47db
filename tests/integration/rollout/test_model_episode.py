"""The agent loop against a real causal LM: the project's char tokenizer and a tiny random
Qwen2 built in code, sampling in a worker thread (a stand-in for the inference
server behind :class:`TurnGenerator`).

What it proves beyond the unit tests: with a real tokenizer and template, every generate call
sees exactly the trajectory's token prefix, so one forward pass over the finished trajectory
reproduces the generator's log-probs at every loss-masked position, across multi-turn episodes
and aborted-then-resumed turns.

Run: ``.venv/bin/pytest tests/integration/rollout -q``
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.config.rollout import RolloutConfig, SamplingConfig
from nexrl_async.core.records import (
    DataItem,
    EvalResult,
    Status,
    Trajectory,
    Turn,
    VersionSpan,
    VersionToken,
)
from nexrl_async.rollout import GeneratedTurn, Message, RolloutWorker, generate_each
from nexrl_async.train.build import build_char_tokenizer, build_model_for

TINY = BuiltModel(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_char_tokenizer(CharTokenizer(alphabet=string.ascii_letters + string.digits + " ?"))


@pytest.fixture(scope="module")
def model(tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    return build_model_for(TINY, tok, seed=0)


class SamplingGenerator:
    """Seeded sampling at temperature 1 with log-probs; the first call of each sample is aborted
    after ``abort_after`` tokens, as a weight publication would, and resumed under version 1."""

    def __init__(self, model: PreTrainedModel, eos_id: int, abort_after: int) -> None:
        self.model = model
        self.eos_id = eos_id
        self.abort_after = abort_after
        self.inputs: dict[str, list[list[int]]] = {}

    async def generate(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        sticky_key: str,
    ) -> GeneratedTurn:
        calls = self.inputs.setdefault(sticky_key, [])
        calls.append(list(input_ids))
        first = len(calls) == 1
        limit = min(max_new_tokens, self.abort_after) if first else max_new_tokens
        seed = len(self.inputs) * 100 + len(calls)
        sample = self._sample
        ids, logprobs, stopped = await anyio.to_thread.run_sync(sample, input_ids, limit, seed)
        finish = "stop" if stopped else ("abort" if first else "length")
        return GeneratedTurn(
            output_ids=ids,
            logprobs=logprobs,
            finish_reason=finish,
            weight_version=0 if first else 1,
        )

    async def generate_group(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        sticky_keys: Sequence[str],
    ) -> list[GeneratedTurn | Exception]:
        return await generate_each(
            self,
            input_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            sticky_keys=sticky_keys,
        )

    @torch.no_grad()
    def _sample(
        self, input_ids: list[int], n: int, seed: int
    ) -> tuple[list[int], list[float], bool]:
        rng = torch.Generator().manual_seed(seed)
        context = list(input_ids)
        out: list[int] = []
        logprobs: list[float] = []
        for _ in range(n):
            logits = self.model(torch.tensor([context])).logits[0, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            token = int(torch.multinomial(logp.exp(), 1, generator=rng))
            out.append(token)
            logprobs.append(float(logp[token]))
            context.append(token)
            if token == self.eos_id:
                return out, logprobs, True
        return out, logprobs, False


class RetryWorker(RolloutWorker):
    """Environment feedback after every turn: the episode runs all ``max_turns`` turns."""

    def on_turn(self, item: DataItem, messages: list[Message], turn: Turn) -> Any:
        return [{"role": "user", "content": "try again"}]


def count_letters(item: DataItem, trajectory: Trajectory) -> EvalResult:
    return EvalResult(reward=float(sum(ch.isalpha() for ch in trajectory.response_text)))


@torch.no_grad()
def trainer_logprobs(model: PreTrainedModel, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, from one forward pass."""
    logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


async def test_multi_turn_episode_matches_a_single_forward_pass(
    tok: PreTrainedTokenizerFast, model: PreTrainedModel
) -> None:
    cfg = RolloutConfig(
        evaluator="unused.py:E", group_size=2, max_turns=3, max_new_tokens=6, sample_timeout_s=60
    )
    generator = SamplingGenerator(model, tok.eos_token_id, abort_after=2)
    worker = RetryWorker(
        cfg,
        tokenizer=tok,
        generator=generator,
        evaluator=count_letters,
        context_length=TINY.max_position_embeddings,
    )
    item = DataItem(key="0:0", index=0, epoch=0, fields={"prompt": "what is 12 plus 30?"})
    token = VersionToken(lease_id=0, version=0)
    with anyio.fail_after(60):
        group = await worker.run_group(item, token, group_id="g0")
    for traj in group.trajectories:
        assert traj.status is Status.OK, traj.failure_detail
        assert [t.role for t in traj.turns] == ["user", "assistant"] * 3
        ids = traj.token_ids
        # every call saw a prefix of the final sequence
        for seen in generator.inputs[f"g0:{traj.sample_index}"]:
            assert ids[: len(seen)] == seen
        # the generator's logprobs are reproduced by one pass over the whole trajectory
        recomputed = trainer_logprobs(model, ids)
        mask = traj.loss_mask
        served = [lp for t in traj.turns if t.logprobs is not None for lp in t.logprobs]
        at_mask = [recomputed[i - 1] for i in range(1, len(ids)) if mask[i]]
        assert mask[0] == 0
        assert at_mask == pytest.approx(served, abs=1e-4)
        # the first turn was interrupted after 2 tokens and resumed under version 1
        first = traj.turns[1]
        assert first.versions[0] == VersionSpan(start=0, end=2, version=0)
        assert traj.head_version == 0
        assert traj.reward == sum(ch.isalpha() for ch in traj.response_text)
