"""Tools the model may call: JSON schemas from type hints, call parsing, and calling.

A tool is a Python callable named in the recipe as ``file.py:function``; ``async def`` ones are
awaited, plain ones run in a worker thread. Its name is the function's name, its description
the first paragraph of its docstring, and its parameters' JSON schema comes from the type
hints (via a msgspec Struct built from the signature, so ``Annotated[int, Meta(ge=0,
description=...)]`` works too). Arguments the model sends are validated and converted against
the same Struct before the call.

Calls are parsed from the model's text in the Qwen / Hermes format::

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

Every problem with a call (malformed JSON, unknown tool, bad arguments, the tool raising) is
reported back to the model as the tool message's content (``"error: ..."``); it never fails
the sample. Tools that execute model-written code run it through
:mod:`nexrl_async.rollout.sandbox` (``nexrl_async.rollout.sandbox:python`` is one ready-made).
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio.to_thread
import msgspec
from loguru import logger
from msgspec import Struct

from nexrl_async.core.errors import UserCodeError

Message = dict[str, Any]
"""A chat message as the chat template sees it: ``{"role": ..., "content": ...}`` (+ extras)."""

_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


class ToolCall(Struct, frozen=True, kw_only=True):
    """One parsed call. ``error`` is set (and the rest may be empty) when it could not be parsed."""

    name: str
    arguments: dict[str, Any] = {}
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>{json}</tool_call>`` block of ``text``, in order.

    ``arguments`` may be an object or a JSON string holding one. An unterminated block at the
    end of the text is parsed as if it were closed.
    """
    return [_parse_one(body) for body in _CALL_RE.findall(text)]


def _parse_one(body: str) -> ToolCall:
    try:
        raw = msgspec.json.decode(body.strip())
    except msgspec.DecodeError as err:
        return ToolCall(name="", error=f"invalid tool call JSON: {err}")
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return ToolCall(name="", error='a tool call must be {"name": ..., "arguments": {...}}')
    arguments = raw.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = msgspec.json.decode(arguments) if arguments.strip() else {}
        except msgspec.DecodeError as err:
            return ToolCall(name=raw["name"], error=f"invalid arguments JSON: {err}")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return ToolCall(name=raw["name"], error="tool call arguments must be a JSON object")
    return ToolCall(name=raw["name"], arguments=arguments)


class Tool:
    """A callable offered to the model, with its schema and argument validation."""

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", ""))
        if not self.name.isidentifier():
            raise UserCodeError(f"tool {fn!r} needs an identifier name, got {self.name!r}")
        self.is_async = _is_async(fn)
        self._params = _params_struct(fn, self.name)
        self.schema = _schema(self.name, _description(fn), self._params)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        """Validate ``arguments`` and call the tool; its exceptions propagate."""
        try:
            args = msgspec.convert(dict(arguments), type=self._params, strict=False)
        except msgspec.ValidationError as err:
            raise ValueError(f"bad arguments for {self.name}: {err}") from err
        kwargs = {f: getattr(args, f) for f in self._params.__struct_fields__}
        if self.is_async:
            return await self.fn(**kwargs)
        return await anyio.to_thread.run_sync(
            functools.partial(self.fn, **kwargs), abandon_on_cancel=True
        )


class ToolResult(Struct, frozen=True, kw_only=True):
    """What one call gave the model: ``content`` (``"error: ..."`` when it failed) and
    whether it ran without error (``ok``)."""

    name: str
    content: str
    ok: bool

    @property
    def message(self) -> Message:
        """The ``{"role": "tool", ...}`` message that carries it."""
        return {"role": "tool", "name": self.name, "content": self.content}


async def run_tool_calls(tools: Mapping[str, Tool], calls: Sequence[ToolCall]) -> list[Message]:
    """Run ``calls`` one after another; one ``{"role": "tool", ...}`` message per call."""
    return [result.message for result in await call_tools(tools, calls)]


async def call_tools(tools: Mapping[str, Tool], calls: Sequence[ToolCall]) -> list[ToolResult]:
    """Run ``calls`` one after another; one :class:`ToolResult` per call. A call fails (``ok``
    false) when it could not be parsed, names no tool, has bad arguments or the tool raised."""
    return [await _run_one(tools, call) for call in calls]


async def _run_one(tools: Mapping[str, Tool], call: ToolCall) -> ToolResult:
    def failed(text: str) -> ToolResult:
        return ToolResult(name=call.name, content=f"error: {text}", ok=False)

    if call.error is not None:
        return failed(call.error)
    tool = tools.get(call.name)
    if tool is None:
        return failed(f"unknown tool {call.name!r}; available: {', '.join(sorted(tools))}")
    # A second, narrow fault boundary: whatever a tool raises is shown to the model as the
    # tool's answer (cancellation is a BaseException and passes through).
    try:
        result = await tool.call(call.arguments)
    except Exception as err:  # noqa: BLE001
        logger.debug("tool {} raised {}: {}", call.name, type(err).__name__, err)
        return failed(f"{type(err).__name__}: {err}")
    return ToolResult(name=call.name, content=result_text(result), ok=True)


def result_text(result: Any) -> str:
    """A tool's return value as message content: strings as-is, ``None`` as "", else JSON."""
    if result is None:
        return ""
    if isinstance(result, str):
        return result
    try:
        return msgspec.json.encode(result, enc_hook=str).decode()
    except (TypeError, ValueError, msgspec.EncodeError):
        return str(result)


def _is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - async callable objects count too
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def _params_struct(fn: Callable[..., Any], name: str) -> type[Struct]:
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
    except (TypeError, ValueError, NameError) as err:
        raise UserCodeError(f"tool {name}: cannot read its signature: {err}") from err
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for param in signature.parameters.values():
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise UserCodeError(
                f"tool {name}: parameter {param.name!r} must be passable by keyword "
                "(no *args, **kwargs or positional-only parameters)"
            )
        hint = hints.get(param.name, Any)
        if param.default is param.empty:
            fields.append((param.name, hint))
        else:
            fields.append((param.name, hint, param.default))
    return msgspec.defstruct(f"{name}_args", fields, kw_only=True, forbid_unknown_fields=True)


def _schema(name: str, description: str, params: type[Struct]) -> dict[str, Any]:
    """OpenAI-style function schema (what HF chat templates take as ``tools=``)."""
    try:
        document = msgspec.json.schema(params)
    except (TypeError, ValueError) as err:
        raise UserCodeError(f"tool {name}: no JSON schema for its parameters: {err}") from err
    defs: dict[str, Any] = document.get("$defs", {})
    parameters = dict(defs.pop(params.__name__))
    parameters.pop("title", None)
    parameters.setdefault("properties", {})
    parameters.setdefault("required", [])
    if defs:  # nested structs: their "#/$defs/..." refs resolve against ``parameters``
        parameters["$defs"] = defs
    function = {"name": name, "description": description, "parameters": parameters}
    return {"type": "function", "function": function}


def _description(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()
