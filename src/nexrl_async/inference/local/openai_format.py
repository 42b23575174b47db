"""OpenAI response objects (choices, usage, stream chunks) built from finished requests.

Tool calls: when a chat request offers tools (and ``tool_choice`` is not ``"none"``), the
generated text is split by :mod:`nexrl_async.inference.tool_calls` (the Hermes / Qwen
``<tool_call>{json}</tool_call>`` format): each well-formed call to an offered tool becomes a
``message.tool_calls`` entry (``id``, ``type: "function"``, ``function.name``,
``function.arguments`` as a JSON string), ``content`` keeps the text outside the calls (``null``
when nothing is left), and ``finish_reason`` is ``"tool_calls"`` when the generation stopped
(not on ``"length"``). Malformed call text stays in ``content``. Streams send a call whole, in
one ``delta.tool_calls`` chunk, once its end tag has arrived, and hold back content that may
still turn out to be a call.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection
from typing import Any

from nexrl_async.inference.local.app_state import ServerContext
from nexrl_async.inference.local.request import Request
from nexrl_async.inference.local.step_plan import LogprobEntry
from nexrl_async.inference.tool_calls import ParsedCall, ToolCallStream, split_tool_calls

ToolNames = Collection[str] | None
"""Names of the tools a chat request offered; ``None``: do not parse tool calls."""


def finish_fields(req: Request) -> tuple[str | None, int | str | None]:
    """``finish_reason`` string and ``matched_stop`` of a request (None while running)."""
    if req.finish is None:
        return None, None
    kind = str(req.finish.get("type"))
    return kind, req.finish.get("matched") if kind == "stop" else None


def usage(requests: list[Request]) -> dict[str, int]:
    prompts = {id(r.prompt_ids): len(r.prompt_ids) for r in requests}
    prompt_tokens = sum(prompts.values())
    completion = sum(len(r.output_ids) for r in requests)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "reasoning_tokens": 0,
    }


def _chat_entry(entry: LogprobEntry, ctx: ServerContext) -> dict[str, Any]:
    text = ctx.token_text(entry[1])
    return {"token": text, "bytes": list(text.encode()), "logprob": entry[0]}


def chat_logprobs(req: Request, ctx: ServerContext, start: int = 0) -> dict[str, Any]:
    content = []
    for i in range(start, len(req.output_logprobs)):
        item = _chat_entry(req.output_logprobs[i], ctx)
        top = req.output_top[i] if i < len(req.output_top) else None
        item["top_logprobs"] = [_chat_entry(e, ctx) for e in top or []]
        content.append(item)
    return {"content": content}


def _tool_call(call: ParsedCall, index: int | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {} if index is None else {"index": index}
    entry.update(
        id=f"call_{uuid.uuid4().hex[:24]}",
        type="function",
        function={"name": call.name, "arguments": call.arguments},
    )
    return entry


def _with_calls(reason: str | None, calls: list[ParsedCall]) -> str | None:
    """``finish_reason``: a generation that stopped after making calls says ``tool_calls``."""
    return "tool_calls" if calls and reason == "stop" else reason


def chat_choice(
    req: Request, ctx: ServerContext, logprobs: bool, tools: ToolNames = None
) -> dict[str, Any]:
    reason, matched = finish_fields(req)
    content: str | None = req.text
    tool_calls: list[dict[str, Any]] | None = None
    if tools is not None:
        split = split_tool_calls(req.text, tools)
        if split.calls:
            content = split.content or None
            tool_calls = [_tool_call(call) for call in split.calls]
            reason = _with_calls(reason, split.calls)
    return {
        "index": req.index,
        "message": {
            "role": "assistant",
            "content": content,
            "reasoning_content": None,
            "tool_calls": tool_calls,
        },
        "logprobs": chat_logprobs(req, ctx) if logprobs else None,
        "finish_reason": reason,
        "matched_stop": matched,
    }


def _legacy_logprobs(req: Request, ctx: ServerContext, echo: bool) -> dict[str, Any]:
    entries: list[LogprobEntry] = []
    tops: list[list[LogprobEntry] | None] = []
    if echo and req.input_logprobs is not None:
        entries += req.input_logprobs.tokens
        tops += req.input_logprobs.top
    entries += req.output_logprobs
    tops += req.output_top
    tokens = [ctx.token_text(tok) for _, tok in entries]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _ in entries],
        "top_logprobs": [
            None if top is None else {ctx.token_text(t): lp for lp, t in top} for top in tops
        ],
        "text_offset": offsets,
    }


def completion_choice(req: Request, ctx: ServerContext, echo: bool) -> dict[str, Any]:
    reason, matched = finish_fields(req)
    prefix = str(ctx.tokenizer.decode(req.prompt_ids, skip_special_tokens=True)) if echo else ""
    return {
        "index": req.index,
        "text": prefix + req.text,
        "logprobs": _legacy_logprobs(req, ctx, echo) if req.logprobs.enabled else None,
        "finish_reason": reason,
        "matched_stop": matched,
    }


class _Deltas:
    """What each request has already sent in a stream (text characters, log-prob entries)."""

    def __init__(self) -> None:
        self.text: dict[int, str] = {}
        self.logprobs: dict[int, int] = {}

    def text_delta(self, req: Request) -> str:
        before = self.text.get(req.index, "")
        if not req.text.startswith(before):
            return ""
        self.text[req.index] = req.text
        return req.text[len(before) :]

    def logprob_start(self, req: Request) -> int:
        start = self.logprobs.get(req.index, 0)
        self.logprobs[req.index] = len(req.output_logprobs)
        return start


class _CallDeltas:
    """Per choice of a stream that offered tools: content and calls through a
    :class:`ToolCallStream` (fed only while the text grows; the final text decides)."""

    def __init__(self, tools: Collection[str]) -> None:
        self.tools = tools
        self.streams: dict[int, ToolCallStream] = {}
        self.fed: dict[int, str] = {}

    def delta(self, req: Request) -> dict[str, Any]:
        stream = self.streams.setdefault(req.index, ToolCallStream(self.tools))
        before = self.fed.get(req.index, "")
        if req.finished:
            text, calls = stream.finish(req.text)
        elif req.text.startswith(before):
            text, calls = stream.feed(req.text)
        else:
            text, calls = "", []
        self.fed[req.index] = req.text
        out: dict[str, Any] = {"content": text} if text else {}
        if calls:
            first = len(stream.calls) - len(calls)
            out["tool_calls"] = [_tool_call(c, first + i) for i, c in enumerate(calls)]
        return out

    def finish_reason(self, req: Request, reason: str | None) -> str | None:
        stream = self.streams.get(req.index)
        return _with_calls(reason, stream.calls if stream is not None else [])


async def chat_chunks(
    updates: AsyncIterator[list[Request]],
    requests: list[Request],
    ctx: ServerContext,
    head: dict[str, Any],
    include_usage: bool,
    tools: ToolNames = None,
) -> AsyncIterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects: a role chunk per choice, content (and tool call)
    deltas, finish."""
    head = {"id": requests[0].rid, "object": "chat.completion.chunk", **head}
    for req in requests:
        choice = {"index": req.index, "delta": {"role": "assistant", "content": ""}}
        yield {**head, "choices": [{**choice, "logprobs": None, "finish_reason": None}]}
    sent = _Deltas()
    calls = None if tools is None else _CallDeltas(tools)
    async for changed in updates:
        for req in changed:
            text = sent.text_delta(req)
            delta = {"content": text} if text else {}
            if calls is not None:
                delta = calls.delta(req)
            start = sent.logprob_start(req)
            if not delta and not req.finished and start == len(req.output_logprobs):
                continue
            reason, matched = finish_fields(req)
            if calls is not None:
                reason = calls.finish_reason(req, reason)
            lp = chat_logprobs(req, ctx, start) if req.logprobs.enabled else None
            choice = {
                "index": req.index,
                "delta": delta,
                "logprobs": lp,
                "finish_reason": reason,
                "matched_stop": matched,
            }
            yield {**head, "choices": [choice]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(requests)}


async def completion_chunks(
    updates: AsyncIterator[list[Request]],
    requests: list[Request],
    ctx: ServerContext,
    head: dict[str, Any],
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """``text_completion`` chunks carrying text deltas."""
    head = {"id": requests[0].rid, "object": "text_completion", **head}
    sent = _Deltas()
    async for changed in updates:
        for req in changed:
            text = sent.text_delta(req)
            if not text and not req.finished:
                continue
            reason, matched = finish_fields(req)
            choice = {
                "index": req.index,
                "text": text,
                "logprobs": None,
                "finish_reason": reason,
                "matched_stop": matched,
            }
            yield {**head, "choices": [choice]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(requests)}
