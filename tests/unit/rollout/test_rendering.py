"""ChatRenderer: prompts once, follow-ups as deltas that match a full re-render."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.to_thread
import pytest
from transformers import PreTrainedTokenizerFast

from nexrl_async.core.errors import RolloutError
from nexrl_async.rollout.rendering import INLINE_DECODE_TOKENS, INLINE_RENDER_CHARS, ChatRenderer

USER = [{"role": "user", "content": "1+1?"}]
TOOL = {"role": "tool", "name": "add", "content": "2"}


def full(tok: PreTrainedTokenizerFast, messages: list[dict[str, Any]], **kw: Any) -> str:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
    assert isinstance(text, str)
    return text


def test_prompt_uses_the_template_with_generation_prompt(tok: PreTrainedTokenizerFast) -> None:
    ids = ChatRenderer(tok).prompt(USER)
    assert tok.decode(ids) == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_passes_tool_schemas(tok: PreTrainedTokenizerFast) -> None:
    schema = {"type": "function", "function": {"name": "add"}}
    ids = ChatRenderer(tok, tools=[schema]).prompt(USER)
    assert tok.decode(ids).startswith("<|im_start|>system\nTools: add<|im_end|>\n")


def test_without_template_contents_are_joined(tok: PreTrainedTokenizerFast) -> None:
    renderer = ChatRenderer(tok, apply_chat_template=False)
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    assert tok.decode(renderer.prompt(messages)) == "Be brief.\n1+1?"
    assert tok.decode(renderer.followup([TOOL], [5, 6])) == "2"


def test_followup_after_end_token_equals_a_full_rerender(tok: PreTrainedTokenizerFast) -> None:
    renderer = ChatRenderer(tok)
    prompt = renderer.prompt(USER)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    generated = [*tok.encode("call add", add_special_tokens=False), end]
    delta = renderer.followup([TOOL], generated)
    assert tok.decode(delta) == "\n<|im_start|>tool\n2<|im_end|>\n<|im_start|>assistant\n"
    conversation = [*USER, {"role": "assistant", "content": "call add"}, TOOL]
    assert tok.decode(prompt + generated + delta) == full(tok, conversation)


def test_followup_closes_an_unterminated_assistant_message(
    tok: PreTrainedTokenizerFast,
) -> None:
    generated = tok.encode("</tool_call>", add_special_tokens=False)
    delta = ChatRenderer(tok).followup([TOOL], generated)
    assert tok.decode(delta).startswith("<|im_end|>\n<|im_start|>tool\n2")


def test_several_followup_messages_render_together(tok: PreTrainedTokenizerFast) -> None:
    end = tok.convert_tokens_to_ids("<|im_end|>")
    two = [TOOL, {"role": "tool", "name": "add", "content": "5"}]
    delta = ChatRenderer(tok).followup(two, [end])
    text = tok.decode(delta)
    assert text == "\n<|im_start|>tool\n2<|im_end|>\n<|im_start|>tool\n5<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )


THINK_LAST = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_delta_survives_templates_that_rerender_the_last_assistant_turn(
    tok: PreTrainedTokenizerFast,
) -> None:
    """Like Qwen3, this template decorates only the *last* assistant message, so rendering
    [..., assistant] is not a prefix of rendering [..., assistant, tool]."""
    think = _with_template(tok, THINK_LAST)
    before = [*USER, {"role": "assistant", "content": "call add"}]
    after = [*before, TOOL]
    assert not full(think, after).startswith(
        think.apply_chat_template(before, tokenize=False)  # the naive prefix breaks
    )
    renderer = ChatRenderer(think)
    generated = think.encode("call add<|im_end|>", add_special_tokens=False)
    delta = renderer.followup([TOOL], generated)
    assert think.decode(renderer.prompt(USER) + generated + delta) == full(think, after)


def test_template_that_hides_assistant_content_is_an_error(tok: PreTrainedTokenizerFast) -> None:
    hiding = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    renderer = ChatRenderer(_with_template(tok, hiding))
    with pytest.raises(RolloutError, match="verbatim"):
        renderer.followup([TOOL], [5])


def _with_template(tok: PreTrainedTokenizerFast, template: str) -> PreTrainedTokenizerFast:
    clone = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        chat_template=template,
    )
    return clone


async def test_cheap_work_runs_on_the_loop_and_the_rest_in_the_thread(
    tok: PreTrainedTokenizerFast,
) -> None:
    renderer = ChatRenderer(tok)
    loop = threading.get_ident()
    assert await renderer.run(threading.get_ident, inline=True) == loop
    assert await renderer.run(threading.get_ident) != loop


async def test_inline_work_goes_to_the_thread_while_the_thread_holds_the_tokenizer(
    tok: PreTrainedTokenizerFast,
) -> None:
    """The tokenizer is never used by two threads at once."""
    renderer = ChatRenderer(tok)
    entered, release = threading.Event(), threading.Event()

    def busy() -> None:
        entered.set()
        release.wait(5)

    async def release_soon() -> None:
        await anyio.sleep(0.05)
        release.set()

    loop = threading.get_ident()
    async with anyio.create_task_group() as tg:
        tg.start_soon(renderer.run, busy)
        await anyio.to_thread.run_sync(entered.wait, 5)
        tg.start_soon(release_soon)
        assert await renderer.run(threading.get_ident, inline=True) != loop
    assert await renderer.run(threading.get_ident, inline=True) == loop


def test_which_work_is_cheap(tok: PreTrainedTokenizerFast) -> None:
    plain = ChatRenderer(tok, apply_chat_template=False)
    short = [{"role": "user", "content": "x" * INLINE_RENDER_CHARS}]
    assert plain.renders_inline(short)
    assert not plain.renders_inline([{"role": "user", "content": "x" * (INLINE_RENDER_CHARS + 1)}])
    assert not ChatRenderer(tok).renders_inline(short), "chat templates cost more than a hop"
    assert plain.decodes_inline([1] * INLINE_DECODE_TOKENS)
    assert not plain.decodes_inline([1] * (INLINE_DECODE_TOKENS + 1))
