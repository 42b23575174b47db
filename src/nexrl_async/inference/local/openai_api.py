"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Enough of SGLang's OpenAI layer (docs/sglang_api.md §3) for the official ``openai`` client: the chat
template comes from the tokenizer, unset sampling values come from ``generation_config.json``,
``seed`` becomes ``sampling_seed``, streams send text deltas and end with ``data: [DONE]``.
Responses carry ``metadata.weight_version`` and SGLang's ``matched_stop``.

With ``n > 1`` and a ``seed``, choice ``i`` samples with seed ``seed + i`` (vLLM's rule): the
choices differ from each other, choice 0 is what ``n = 1`` gives, and the same request gives
the same choices again. A chat request that offers ``tools`` gets the Hermes / Qwen
``<tool_call>`` blocks of its answers parsed into ``message.tool_calls`` (``openai_format``;
SGLang needs ``--tool-call-parser`` for that, the local server always does it).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from msgspec import Struct
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.types import ASGIApp

from nexrl_async.core.errors import EngineUnavailable, RequestRejected
from nexrl_async.inference.local.app_state import ServerContext
from nexrl_async.inference.local.error_responses import (
    json_response,
    openai_error,
    unavailable,
    unparseable_body,
)
from nexrl_async.inference.local.http_io import JsonError, decode_json
from nexrl_async.inference.local.openai_format import (
    chat_choice,
    chat_chunks,
    completion_choice,
    completion_chunks,
    usage,
)
from nexrl_async.inference.local.protocol import (
    check_counts,
    check_prompt,
    logprob_request,
    new_rid,
    sampling_spec,
)
from nexrl_async.inference.local.request import Notifier, Request
from nexrl_async.inference.local.sampling import SamplingSpec
from nexrl_async.inference.local.sglang_schema import SamplingParamsBody
from nexrl_async.inference.local.streaming import (
    DONE,
    EventStreamResponse,
    WhenFinished,
    abort_unfinished,
    sse,
    updates,
)

ChunkMaker = Callable[
    [AsyncIterator[list[Request]], list[Request], ServerContext, dict[str, Any], bool],
    AsyncIterator[dict[str, Any]],
]


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAICommon(Struct, kw_only=True):
    model: str = "default"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    no_stop_trim: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    rid: str | None = None
    response_format: dict[str, Any] | None = None


class ChatRequest(_OpenAICommon, kw_only=True):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    input_ids: list[int] | None = None


class CompletionRequest(_OpenAICommon, kw_only=True):
    prompt: str | list[Any]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


def _params(body: _OpenAICommon, max_new: int | None, ctx: ServerContext) -> SamplingParamsBody:
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise RequestRejected(400, "response_format is not supported by the local server.")
    defaults = ctx.sampling_defaults

    def pick(value: Any, name: str, fallback: Any) -> Any:
        return value if value is not None else defaults.get(name, fallback)

    return SamplingParamsBody(
        max_new_tokens=max_new,
        min_new_tokens=body.min_tokens,
        temperature=pick(body.temperature, "temperature", 1.0),
        top_p=pick(body.top_p, "top_p", 1.0),
        top_k=pick(body.top_k, "top_k", -1),
        min_p=pick(body.min_p, "min_p", 0.0),
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=pick(body.repetition_penalty, "repetition_penalty", 1.0),
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        no_stop_trim=body.no_stop_trim,
        logit_bias=body.logit_bias,
        sampling_seed=body.seed,
        n=body.n,
    )


def _samples(
    prompts: list[list[int]],
    params: SamplingParamsBody,
    ctx: ServerContext,
    *,
    rid: str | None,
    stream: bool,
    logprobs: tuple[bool, int, int],
) -> list[Request]:
    """``n`` requests per prompt (prompt-major); ``logprobs`` = (enabled, input start, top n)."""
    enabled, start, top_n = logprobs
    check_counts(len(prompts), params.n, ctx.limits)
    notifier = Notifier()
    out: list[Request] = []
    for raw in prompts:
        prompt = check_prompt(raw, ctx.limits)
        spec = sampling_spec(params, len(prompt), ctx.limits)
        lp = logprob_request(enabled, start, top_n, None, len(prompt), ctx.limits)
        for copy in range(params.n):
            single = rid is not None and len(prompts) == 1 and params.n == 1
            out.append(
                Request(
                    rid=rid if single and rid is not None else new_rid(),
                    prompt_ids=prompt,
                    sampling=_seeded(spec, copy),
                    logprobs=lp,
                    stream=stream,
                    notifier=notifier,
                    index=len(out),
                )
            )
    return out


def _seeded(spec: SamplingSpec, copy: int) -> SamplingSpec:
    """The spec of choice ``copy`` of a prompt: seed ``seed + copy`` (wrapping at 64 bits)."""
    seed = spec.sampling_seed
    if seed is None or copy == 0:
        return spec
    seed += copy
    if seed >= 2**64:
        seed -= 2**64
    return dataclasses.replace(spec, sampling_seed=seed)


def offered_tools(body: ChatRequest) -> frozenset[str] | None:
    """Names of the functions the request offers, or ``None`` when calls are not parsed (no
    tools, or ``tool_choice = "none"``)."""
    if not body.tools or body.tool_choice == "none":
        return None
    names = set()
    for tool in body.tools:
        function = tool.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return frozenset(names)


async def _chat_requests(body: ChatRequest, ctx: ServerContext) -> list[Request]:
    if body.input_ids is not None:
        prompt = check_prompt(body.input_ids, ctx.limits)
    else:
        messages = [_flatten(m) for m in body.messages]
        prompt = await ctx.render_chat(
            messages,
            tools=body.tools,
            continue_final_message=body.continue_final_message,
            template_kwargs=body.chat_template_kwargs or {},
        )
    if not prompt:
        raise RequestRejected(400, "The chat template rendered an empty prompt.")
    max_new = body.max_completion_tokens or body.max_tokens
    top_n = body.top_logprobs or 0
    return _samples(
        [prompt],
        _params(body, max_new, ctx),
        ctx,
        rid=body.rid,
        stream=body.stream,
        logprobs=(body.logprobs, -1, top_n),
    )


def _flatten(message: dict[str, Any]) -> dict[str, Any]:
    """Content given as a list of parts becomes the concatenation of its text parts."""
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return {**message, "content": "".join(parts)}
    if content is None:
        return {**message, "content": ""}
    return message


async def _completion_prompts(body: CompletionRequest, ctx: ServerContext) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return await ctx.encode([prompt])
    if prompt and all(isinstance(p, str) for p in prompt):
        return await ctx.encode(list(prompt))
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(p, list) and p for p in prompt):
        return [list(p) for p in prompt]
    raise RequestRejected(400, "prompt must be a string, a list of strings, or token ids.")


async def _run(
    http: HttpRequest, ctx: ServerContext, kind: type[Any]
) -> tuple[Any, list[Request]] | Response:
    """Decode, validate and submit; returns a ready error response on failure."""
    if http.headers.get("content-type", "application/json").split(";")[0] != "application/json":
        return openai_error(400, "Unsupported Media Type: only 'application/json' is allowed")
    try:
        body = decode_json(await http.body(), kind)
    except JsonError as err:
        return unparseable_body(str(err))
    try:
        check_counts(1, body.n, ctx.limits)
        if isinstance(body, ChatRequest):
            requests = await _chat_requests(body, ctx)
        else:
            if body.max_tokens is not None and body.max_tokens <= 0:
                raise RequestRejected(400, "max_tokens must be positive.")
            prompts = await _completion_prompts(body, ctx)
            top_n = body.logprobs or 0
            start = 0 if body.echo and body.logprobs is not None else -1
            requests = _samples(
                prompts,
                _params(body, body.max_tokens, ctx),
                ctx,
                rid=body.rid,
                stream=body.stream,
                logprobs=(body.logprobs is not None, start, top_n),
            )
        await ctx.scheduler.submit(requests)
    except RequestRejected as err:
        return openai_error(err.status_code, err.message)
    except EngineUnavailable as err:
        return unavailable(str(err))
    return body, requests


async def chat_completions(http: HttpRequest, ctx: ServerContext) -> ASGIApp:
    ran = await _run(http, ctx, ChatRequest)
    if isinstance(ran, Response):
        return ran
    body, requests = ran
    created = int(time.time())
    tools = offered_tools(body)
    if body.stream:
        chunks = functools.partial(chat_chunks, tools=tools)
        return _streaming(chunks, body, requests, ctx, created)

    def build() -> Response:
        return json_response(
            {
                "id": requests[0].rid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [chat_choice(r, ctx, body.logprobs, tools) for r in requests],
                "usage": usage(requests),
                "metadata": {"weight_version": ctx.scheduler.weight_version},
            }
        )

    return WhenFinished(requests, ctx.scheduler, build, ctx.watch)


async def completions(http: HttpRequest, ctx: ServerContext) -> ASGIApp:
    ran = await _run(http, ctx, CompletionRequest)
    if isinstance(ran, Response):
        return ran
    body, requests = ran
    created = int(time.time())
    if body.stream:
        return _streaming(completion_chunks, body, requests, ctx, created)

    def build() -> Response:
        return json_response(
            {
                "id": requests[0].rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [completion_choice(r, ctx, body.echo) for r in requests],
                "usage": usage(requests),
                "metadata": {"weight_version": ctx.scheduler.weight_version},
            }
        )

    return WhenFinished(requests, ctx.scheduler, build, ctx.watch)


def _streaming(
    chunks: ChunkMaker,
    body: _OpenAICommon,
    requests: list[Request],
    ctx: ServerContext,
    created: int,
) -> EventStreamResponse:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = {"created": created, "model": body.model}

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in chunks(updates(requests), requests, ctx, head, include_usage):
                yield sse(chunk)
        finally:
            abort_unfinished(requests, ctx.scheduler)
        yield DONE

    return EventStreamResponse(events())


async def models(http: HttpRequest, ctx: ServerContext) -> Response:
    name = ctx.model_name
    card = {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "sglang",
        "root": name,
        "max_model_len": ctx.limits.context_length,
    }
    return json_response({"object": "list", "data": [card]})
