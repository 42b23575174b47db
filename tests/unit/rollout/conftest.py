"""Fixtures for the agent-loop tests: a tiny char-level chat tokenizer and a scripted generator.

The tokenizer has one token per printable ASCII character plus ``<pad> <bos> <eos>
<|im_start|> <|im_end|>``, and a Qwen-like chat template (``<|im_start|>role\\ncontent
<|im_end|>\\n`` per message, a tool list in a system block). The scripted generator plays the
inference server: a test gives it a function from the call to a :class:`GeneratedTurn` (or an
exception to raise), and it records every call; a group call is one scripted call per sample.
"""

from __future__ import annotations

import string
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from nexrl_async.config.rollout import RolloutConfig, SamplingConfig
from nexrl_async.core.records import (
    DataItem,
    EvalResult,
    FailureReason,
    Status,
    Trajectory,
    VersionToken,
)
from nexrl_async.rollout.generation import GeneratedTurn, generate_each
from nexrl_async.rollout.tools import Tool
from nexrl_async.rollout.worker import RolloutWorker

SPECIALS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: "
    "{{ tools | map(attribute='function') | map(attribute='name') | join(',') }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        chat_template=chat_template,
    )


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@dataclass
class Call:
    """One ``generate`` call as the scripted server saw it."""

    input_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    sticky_key: str
    index: int
    """0-based count of calls with this sticky key (turns and resumes of one sample)."""


Reply = Callable[[Call], Any]
"""Returns a GeneratedTurn, or an exception instance to raise; may be async."""


@dataclass
class ScriptedGenerator:
    """A :class:`TurnGenerator` that answers from a script and records the calls."""

    reply: Reply
    calls: list[Call] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)
    """The sticky keys of every ``generate_group`` call."""

    async def generate(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        sticky_key: str,
    ) -> Any:
        index = sum(1 for c in self.calls if c.sticky_key == sticky_key)
        call = Call(list(input_ids), max_new_tokens, sampling, sticky_key, index)
        self.calls.append(call)
        out = self.reply(call)
        if isinstance(out, Awaitable):
            out = await out
        if isinstance(out, BaseException):
            raise out
        return out

    async def generate_group(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        sticky_keys: Sequence[str],
    ) -> list[GeneratedTurn | Exception]:
        """One scripted call per sample (``generate_each``); the group call is recorded."""
        self.groups.append(list(sticky_keys))
        return await generate_each(
            self,
            input_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            sticky_keys=sticky_keys,
        )

    def for_sample(self, key: str) -> list[Call]:
        return [c for c in self.calls if c.sticky_key == key]


@pytest.fixture
def scripted() -> type[ScriptedGenerator]:
    return ScriptedGenerator


@dataclass
class RecordingEvents:
    """A :class:`RolloutEvents` that keeps every event as a dict."""

    turns: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)

    def turn_generated(self, **kw: Any) -> None:
        self.turns.append(kw)

    def scored(self, **kw: Any) -> None:
        self.scores.append(kw)


@pytest.fixture
def events() -> RecordingEvents:
    return RecordingEvents()


class LengthEvaluator:
    """Reward = characters in the final answer; one metric."""

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult:
        text = trajectory.response_text
        return EvalResult(reward=float(len(text)), metrics={"turns": len(trajectory.turns)})


@pytest.fixture
def evaluator() -> LengthEvaluator:
    return LengthEvaluator()


def make_cfg(**overrides: Any) -> RolloutConfig:
    base: dict[str, Any] = {"evaluator": "evaluator.py:Evaluator", "group_size": 2}
    base.update(overrides)
    return RolloutConfig(**base)


@pytest.fixture
def cfg() -> Callable[..., RolloutConfig]:
    return make_cfg


def make_item(prompt: Any = "1+1?", **fields: Any) -> DataItem:
    return DataItem(key="0:7", index=7, epoch=0, fields={"prompt": prompt, **fields})


@pytest.fixture
def item() -> Callable[..., DataItem]:
    return make_item


def assert_failed(trajectory: Trajectory, reason: FailureReason) -> None:
    assert trajectory.status is Status.FAILED, trajectory
    assert trajectory.failure is reason, (trajectory.failure, trajectory.failure_detail)
    assert trajectory.failure_detail


@pytest.fixture
def failed() -> Callable[[Trajectory, FailureReason], None]:
    return assert_failed


IM_END = SPECIALS.index("<|im_end|>")


def make_turn(
    tok: PreTrainedTokenizerFast,
    text: str,
    *,
    end: bool = True,
    version: int = 0,
    finish: str = "stop",
) -> GeneratedTurn:
    """What a server would answer for ``text`` (followed by ``<|im_end|>`` when ``end``)."""
    ids = tok.encode(text, add_special_tokens=False) + ([IM_END] if end else [])
    return GeneratedTurn(
        output_ids=ids,
        logprobs=[-0.5] * len(ids),
        finish_reason=finish,  # type: ignore[arg-type]
        weight_version=version,
        server="s0",
    )


@pytest.fixture
def says(tok: PreTrainedTokenizerFast) -> Callable[..., GeneratedTurn]:
    def build(text: str, **kw: Any) -> GeneratedTurn:
        return make_turn(tok, text, **kw)

    return build


@pytest.fixture
def worker(
    tok: PreTrainedTokenizerFast, evaluator: LengthEvaluator, events: RecordingEvents
) -> Callable[..., RolloutWorker]:
    """``worker(generator, cls=RolloutWorker, evaluator=..., **cfg_overrides)``."""

    def build(
        generator: Any,
        *,
        cls: type[RolloutWorker] = RolloutWorker,
        tools: Sequence[Tool] = (),
        required: Sequence[str] = (),
        context_length: int | None = None,
        max_resumes: int = 8,
        evaluate: Any = None,
        **overrides: Any,
    ) -> RolloutWorker:
        return cls(
            make_cfg(**overrides),
            tokenizer=tok,
            generator=generator,
            evaluator=evaluate if evaluate is not None else evaluator,
            tools=tools,
            required=required,
            events=events,
            context_length=context_length,
            max_resumes=max_resumes,
        )

    return build


TOKEN = VersionToken(lease_id=3, version=1)


@pytest.fixture
def token() -> VersionToken:
    return TOKEN
