"""OpenAI response objects (choices, usage, stream chunks) built from finished requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from nexrl_async.inference.local.app_state import ServerContext
from nexrl_async.inference.local.request import Request
from nexrl_async.inference.local.step_plan import LogprobEntry


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


def chat_choice(req: Request, ctx: ServerContext, logprobs: bool) -> dict[str, Any]:
    reason, matched = finish_fields(req)
    return {
        "index": req.index,
        "message": {
            "role": "assistant",
            "content": req.text,
            "reasoning_content": None,
            "tool_calls": None,
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


async def chat_chunks(
    updates: AsyncIterator[list[Request]],
    requests: list[Request],
    ctx: ServerContext,
    head: dict[str, Any],
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects: a role chunk per choice, content deltas, finish."""
    head = {"id": requests[0].rid, "object": "chat.completion.chunk", **head}
    for req in requests:
        choice = {"index": req.index, "delta": {"role": "assistant", "content": ""}}
        yield {**head, "choices": [{**choice, "logprobs": None, "finish_reason": None}]}
    sent = _Deltas()
    async for changed in updates:
        for req in changed:
            text = sent.text_delta(req)
            start = sent.logprob_start(req)
            if not text and not req.finished and start == len(req.output_logprobs):
                continue
            reason, matched = finish_fields(req)
            lp = chat_logprobs(req, ctx, start) if req.logprobs.enabled else None
            choice = {
                "index": req.index,
                "delta": {"content": text} if text else {},
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
