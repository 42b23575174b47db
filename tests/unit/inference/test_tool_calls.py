"""The Hermes / Qwen tool-call splitter: strict calls, content kept verbatim, streams agree."""

from __future__ import annotations

import json

import pytest

from nexrl_async.inference.tool_calls import ParsedCall, ToolCallStream, split_tool_calls

ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
MUL = '<tool_call>\n{"name": "mul", "arguments": "{\\"x\\": [1, 2]}"}\n</tool_call>'
TOOLS = {"add", "mul"}


def test_calls_leave_the_content_outside_them() -> None:
    split = split_tool_calls(f"Let me add.\n{ADD}\n", TOOLS)
    assert split.content == "Let me add."
    assert split.calls == [ParsedCall(name="add", arguments='{"a": 1, "b": 2}')]
    assert json.loads(split.calls[0].arguments) == {"a": 1, "b": 2}


def test_text_after_a_call_keeps_the_whitespace_that_separates_it() -> None:
    assert split_tool_calls(f"Let me add.\n{ADD}\nDone.", TOOLS).content == "Let me add.\nDone."
    assert split_tool_calls(f"{ADD}\n\nDone.", TOOLS).content == "Done."
    assert split_tool_calls(f"Both:\n{ADD}\n{MUL}\n", TOOLS).content == "Both:"


def test_parallel_calls_and_string_arguments() -> None:
    split = split_tool_calls(f"{ADD}\n{MUL}", TOOLS)
    assert split.content == ""
    assert [c.name for c in split.calls] == ["add", "mul"]
    assert json.loads(split.calls[1].arguments) == {"x": [1, 2]}


@pytest.mark.parametrize(
    "body",
    [
        "{not json}",
        '["add"]',
        '{"arguments": {}}',
        '{"name": "", "arguments": {}}',
        '{"name": "add", "arguments": [1]}',
        '{"name": "add", "arguments": "not json"}',
        '{"name": "sub", "arguments": {}}',  # not an offered tool
    ],
)
def test_malformed_calls_stay_in_the_content(body: str) -> None:
    text = f"before <tool_call>{body}</tool_call> after"
    split = split_tool_calls(text, TOOLS)
    assert split.calls == []
    assert split.content == text


def test_an_unclosed_block_stays_text_and_a_good_call_before_it_counts() -> None:
    text = f'{ADD}\n<tool_call>{{"name": "mul"'
    split = split_tool_calls(text, TOOLS)
    assert [c.name for c in split.calls] == ["add"]
    assert split.content == '<tool_call>{"name": "mul"'


def test_missing_arguments_and_the_parameters_alias() -> None:
    text = (
        '<tool_call>{"name": "add"}</tool_call>'
        '<tool_call>{"name": "mul", "parameters": {"x": 1}}</tool_call>'
    )
    split = split_tool_calls(text, None)  # None: any name
    parsed = [(c.name, json.loads(c.arguments)) for c in split.calls]
    assert parsed == [("add", {}), ("mul", {"x": 1})]


def test_text_without_calls_is_verbatim() -> None:
    for text in ["", "plain\n", "  spaced  ", "a < b <tool", "x <tool_call"]:
        split = split_tool_calls(text, TOOLS)
        assert (split.content, split.calls) == (text, [])


@pytest.mark.parametrize(
    "text",
    [
        f"Let me add.\n{ADD}\n",
        f"{ADD}\n{MUL}",
        f"one {ADD} two <tool_call>bad</tool_call> three {MUL}  ",
        f"Let me add.\n{ADD}\n\nDone.\n",
        f"{ADD} \n{MUL}\n then",
        f'{ADD}\n<tool_call>{{"name": "mul"',
        "no calls at all, trailing space  \n",
        "ends in a partial tag <tool_c",
    ],
)
def test_a_stream_fed_piece_by_piece_agrees_with_the_whole(text: str) -> None:
    whole = split_tool_calls(text, TOOLS)
    for step in (1, 3, 7):
        stream = ToolCallStream(TOOLS)
        content: list[str] = []
        calls: list[ParsedCall] = []
        for end in range(step, len(text), step):
            delta, new = stream.feed(text[:end])
            content.append(delta)
            calls.extend(new)
        delta, new = stream.finish(text)
        content.append(delta)
        calls.extend(new)
        assert "".join(content) == whole.content
        assert calls == whole.calls


def test_a_stream_holds_back_what_may_become_a_call() -> None:
    stream = ToolCallStream(TOOLS)
    assert stream.feed("Sure <tool") == ("Sure", [])
    assert stream.feed("Sure <tool_call>{") == ("", [])
    delta, calls = stream.feed(f"Sure {ADD} and")
    assert delta == " and"  # the whitespace after the call separates the text
    assert [c.name for c in calls] == ["add"]
