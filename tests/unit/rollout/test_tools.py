"""Tool-call parsing, schemas from type hints, and calling tools (errors become messages)."""

from __future__ import annotations

import threading
from typing import Annotated, Any

import anyio
import pytest
from msgspec import Meta, Struct

from nexrl_async.core.errors import UserCodeError
from nexrl_async.rollout.tools import (
    Tool,
    ToolCall,
    call_tools,
    parse_tool_calls,
    run_tool_calls,
)


async def add(a: int, b: int = 2) -> int:
    """Add two integers.

    Longer explanation that is not part of the description.
    """
    return a + b


def shout(text: Annotated[str, Meta(description="what to shout")], times: int = 1) -> str:
    """Upper-case text."""
    return text.upper() * times


class Point(Struct):
    x: float
    y: float


async def norm(p: Point, scale: list[float] | None = None) -> float:
    return (p.x**2 + p.y**2) ** 0.5 * (scale[0] if scale else 1.0)


async def broken(x: int) -> int:
    raise RuntimeError(f"boom {x}")


def test_parse_one_call_with_surrounding_text() -> None:
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    assert parse_tool_calls(text) == [ToolCall(name="add", arguments={"a": 1})]


def test_parse_several_calls_and_string_arguments() -> None:
    text = (
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call> and '
        '<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call>'
    )
    calls = parse_tool_calls(text)
    assert calls == [
        ToolCall(name="add", arguments={"a": 3}),
        ToolCall(name="shout", arguments={"text": "hi"}),
    ]


def test_parse_no_call() -> None:
    assert parse_tool_calls("The answer is 2.") == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("<tool_call>{not json}</tool_call>", "invalid tool call JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', "must be"),
        ('<tool_call>["add"]</tool_call>', "must be"),
        ('<tool_call>{"name": "add", "arguments": "{oops"}</tool_call>', "invalid arguments"),
        ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', "JSON object"),
    ],
)
def test_malformed_calls_carry_an_error(text: str, error: str) -> None:
    (call,) = parse_tool_calls(text)
    assert call.error is not None
    assert error in call.error


def test_unterminated_call_at_the_end_is_parsed() -> None:
    (call,) = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}')
    assert call == ToolCall(name="add", arguments={"a": 1})


def test_schema_from_type_hints_and_docstring() -> None:
    schema = Tool(add).schema
    assert schema == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "default": 2}},
                "required": ["a"],
                "additionalProperties": False,
            },
        },
    }
    text = Tool(shout).schema["function"]["parameters"]["properties"]["text"]
    assert text == {"type": "string", "description": "what to shout"}


def test_schema_keeps_nested_definitions_resolvable() -> None:
    params = Tool(norm).schema["function"]["parameters"]
    assert params["properties"]["p"] == {"$ref": "#/$defs/Point"}
    assert set(params["$defs"]["Point"]["properties"]) == {"x", "y"}
    assert params["required"] == ["p"]


def test_tools_must_take_keyword_arguments() -> None:
    def variadic(*args: int) -> int:
        return 0

    def positional(a: int, /) -> int:
        return a

    for fn in (variadic, positional):
        with pytest.raises(UserCodeError, match="passable by keyword"):
            Tool(fn)


async def test_call_converts_arguments_and_awaits() -> None:
    assert await Tool(add).call({"a": 5}) == 7
    assert await Tool(norm).call({"p": {"x": 3, "y": 4}, "scale": [2]}) == 10.0


async def test_sync_tools_run_in_a_worker_thread() -> None:
    seen: list[int] = []

    def where() -> str:
        seen.append(threading.get_ident())
        return "ok"

    assert await Tool(where).call({}) == "ok"
    assert seen
    assert seen[0] != threading.get_ident()


async def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="bad arguments for add"):
        await Tool(add).call({"a": "x"})
    with pytest.raises(ValueError, match="bad arguments for add"):
        await Tool(add).call({"a": 1, "c": 3})


async def test_run_tool_calls_turns_every_problem_into_a_message() -> None:
    tools = {t.name: t for t in (Tool(add), Tool(shout), Tool(broken))}
    calls = [
        ToolCall(name="add", arguments={"a": 1, "b": 1}),
        ToolCall(name="shout", arguments={"text": "hi", "times": 2}),
        ToolCall(name="nope"),
        ToolCall(name="broken", arguments={"x": 3}),
        ToolCall(name="add", arguments={"a": "x"}),
        ToolCall(name="", error="invalid tool call JSON: x"),
    ]
    messages = await run_tool_calls(tools, calls)
    contents = [m["content"] for m in messages]
    assert [m["role"] for m in messages] == ["tool"] * 6
    assert [m["name"] for m in messages] == ["add", "shout", "nope", "broken", "add", ""]
    assert contents[:2] == ["2", "HIHI"]
    assert contents[2].startswith("error: unknown tool 'nope'")
    assert contents[3] == "error: RuntimeError: boom 3"
    assert contents[4].startswith("error: ValueError: bad arguments for add")
    assert contents[5] == "error: invalid tool call JSON: x"
    # the same calls, with their outcome (what rollout/tool_success_rate counts)
    results = await call_tools(tools, calls)
    assert [r.message for r in results] == messages
    assert [r.ok for r in results] == [True, True, False, False, False, False]


async def test_results_are_json_encoded() -> None:
    async def info() -> dict[str, Any]:
        return {"a": [1, 2], "b": None}

    async def nothing() -> None:
        return None

    tools = {"info": Tool(info), "nothing": Tool(nothing)}
    messages = await run_tool_calls(tools, [ToolCall(name="info"), ToolCall(name="nothing")])
    assert [m["content"] for m in messages] == ['{"a":[1,2],"b":null}', ""]


async def test_cancellation_passes_through_a_tool() -> None:
    started = anyio.Event()
    finished: list[str] = []

    async def slow() -> str:
        started.set()
        try:
            await anyio.sleep(10)
        finally:
            finished.append("cleanup")
        return "never"

    tools = {"slow": Tool(slow)}
    with anyio.move_on_after(5) as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_tool_calls, tools, [ToolCall(name="slow")])
            await started.wait()
            tg.cancel_scope.cancel()
    assert not outer.cancelled_caught
    assert finished == ["cleanup"]
