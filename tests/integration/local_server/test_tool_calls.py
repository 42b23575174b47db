"""OpenAI tool calls and seeded ``n > 1`` from ``nexrl-async serve``, through the openai client.

A tiny random model never writes a ``<tool_call>`` block, so the tool-call tests serve a model
built to: a one-layer Qwen2 whose attention and MLP outputs are zero and whose token
embeddings are one-hot, so the logits depend on the current token only (a bigram table in
``lm_head``), over a character tokenizer with four multi-character tokens added. Greedy
decoding after the prompt's last token then writes, token by token (see ``PIECES``)::

    o k <tool_call>\\n {"name": "add", ...} \\n</tool_call>\\n<tool_call>\\n
    {"name": "mul", ...} \\n</tool_call> <eos>

The server, the chat template, the tokenizer and the sampling are the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.train.build import build_char_tokenizer, build_model, save_model_dir

pytestmark = pytest.mark.timeout(180)

ADD = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
MUL = '{"name": "mul", "arguments": {"x": 3, "y": 4}}'
PIECES = ["o", "k", "<tool_call>\n", ADD, "\n</tool_call>\n<tool_call>\n", MUL, "\n</tool_call>"]
TEXT = "".join(PIECES)
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} two numbers",
            "parameters": {
                "type": "object",
                "properties": {k: {"type": "integer"} for k in keys},
                "required": list(keys),
            },
        },
    }
    for name, keys in (("add", ("a", "b")), ("mul", ("x", "y")))
]
API_KEY = "test-key"  # the local_server conftest's


def bigram_model_dir(path: Path) -> Path:
    """The model and tokenizer described in the module docstring, saved to ``path``."""
    tok = build_char_tokenizer(CharTokenizer(alphabet="ok"))
    tok.add_tokens(PIECES[2:])
    ids = [tok.convert_tokens_to_ids(piece) for piece in PIECES]
    assert all(isinstance(i, int) and i >= 0 for i in ids), ids
    assert len(set(ids)) == len(ids), ids
    vocab = len(tok)
    cfg = BuiltModel(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    assert vocab <= cfg.hidden_size
    model = build_model(
        cfg, vocab_size=vocab, seed=0, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    successor = dict(zip([tok.sep_token_id, *ids], [*ids, tok.eos_token_id], strict=True))
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.zero_()
        embed[:, :vocab] = torch.eye(vocab)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = model.get_output_embeddings().weight
        head.zero_()
        for current, following in successor.items():
            head[following, current] = 10.0
    return save_model_dir(model, tok, path)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tool_oai(
    launch_shared: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> openai.OpenAI:
    server = launch_shared(bigram_model_dir(tmp_path_factory.mktemp("bigram")))
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)


def chat(oai: openai.OpenAI, **extra: Any) -> Any:
    return oai.chat.completions.create(
        model="bigram", messages=[{"role": "user", "content": "ok"}], temperature=0, **extra
    )


def test_the_model_writes_the_call_text_on_its_own(tool_oai: openai.OpenAI) -> None:
    choice = chat(tool_oai).choices[0]
    assert choice.message.content == TEXT  # no tools offered: nothing is parsed
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"


def test_offered_tools_come_back_as_tool_calls(tool_oai: openai.OpenAI) -> None:
    choice = chat(tool_oai, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "ok"
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.type, c.function.name) for c in calls] == [("function", "add"), ("function", "mul")]
    assert [json.loads(c.function.arguments) for c in calls] == [{"a": 1, "b": 2}, {"x": 3, "y": 4}]
    assert len({c.id for c in calls}) == 2
    assert all(c.id.startswith("call_") for c in calls)


def test_a_call_to_a_tool_not_offered_stays_text(tool_oai: openai.OpenAI) -> None:
    choice = chat(tool_oai, tools=TOOLS[:1]).choices[0]
    assert [c.function.name for c in choice.message.tool_calls or []] == ["add"]
    assert choice.message.content == f"ok\n<tool_call>\n{MUL}\n</tool_call>"
    assert choice.finish_reason == "tool_calls"


def test_a_truncated_call_stays_text(tool_oai: openai.OpenAI) -> None:
    choice = chat(tool_oai, tools=TOOLS, max_tokens=4).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content == "".join(PIECES[:4])
    assert choice.message.tool_calls is None


def test_tool_choice_none_leaves_the_text_alone(tool_oai: openai.OpenAI) -> None:
    choice = chat(tool_oai, tools=TOOLS, tool_choice="none").choices[0]
    assert choice.message.content == TEXT
    assert choice.message.tool_calls is None


def test_a_stream_sends_the_calls_and_holds_their_text_back(tool_oai: openai.OpenAI) -> None:
    chunks = list(chat(tool_oai, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "ok"
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "add"), (1, "mul")]
    assert json.loads(deltas[1].function.arguments or "") == {"x": 3, "y": 4}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_n_with_a_seed_gives_distinct_reproducible_choices(oai: openai.OpenAI) -> None:
    def sample(n: int) -> list[str]:
        done = oai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "1+2="}], n=n, seed=1,
            temperature=1.0, max_tokens=12, extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert [c.index for c in done.choices] == list(range(n))
        return [c.message.content or "" for c in done.choices]

    first = sample(4)
    assert len(set(first)) == 4, first  # the choices differ from each other
    assert sample(4) == first  # the same request gives the same choices
    assert sample(1) == first[:1]  # choice 0 is what n = 1 gives
