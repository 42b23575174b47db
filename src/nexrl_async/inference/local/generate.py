"""``POST /generate``: SGLang's native generation route (docs/sglang_api.md §2).

Single prompt with ``n == 1`` answers one object; a list of prompts or ``n > 1`` answers a list
in prompt-major order. Streams are SSE with cumulative chunks (SGLang's default), a batch
stream tags each chunk with ``index``, and every stream ends with ``data: [DONE]``. A client
that disconnects aborts its requests.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.types import ASGIApp

from nexrl_async.core.errors import EngineUnavailable, RequestRejected
from nexrl_async.inference.local.app_state import ServerContext
from nexrl_async.inference.local.error_responses import (
    json_response,
    native_error,
    schema_error,
    unavailable,
)
from nexrl_async.inference.local.http_io import JsonError, decode_json
from nexrl_async.inference.local.protocol import (
    GenerateRequest,
    check_counts,
    check_prompt,
    logprob_request,
    new_rid,
    sampling_spec,
)
from nexrl_async.inference.local.request import Notifier, Request
from nexrl_async.inference.local.sampling import SamplingSpec
from nexrl_async.inference.local.sglang_schema import SamplingParamsBody
from nexrl_async.inference.local.step_plan import LogprobEntry, LogprobRequest
from nexrl_async.inference.local.streaming import (
    DONE,
    EventStreamResponse,
    WhenFinished,
    abort_unfinished,
    sse,
    updates,
)


def _per_item(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise RequestRejected(400, f"{name} has {len(value)} entries for {count} prompts.")
        return value
    return [value] * count


def _batched_ids(ids: list[Any]) -> bool:
    return bool(ids) and all(isinstance(x, list) for x in ids)


def _prompt_count(body: GenerateRequest) -> int:
    """How many prompts the request holds, before anything is tokenized or checked."""
    if body.input_embeds is not None:
        raise RequestRejected(400, "input_embeds is not supported by the nexrl_async local server.")
    if body.lora_path is not None or body.session_params is not None:
        raise RequestRejected(400, "LoRA adapters and sessions are not supported by this server.")
    if body.input_ids is not None:
        return len(body.input_ids) if _batched_ids(body.input_ids) else 1
    if body.text is None:
        raise RequestRejected(400, "Either text, input_ids or input_embeds should be provided.")
    return len(body.text) if isinstance(body.text, list) else 1


async def _prompts(body: GenerateRequest, ctx: ServerContext) -> tuple[list[list[int]], bool]:
    """Prompt token ids and whether the request is a batch (the text decides the shape)."""
    if body.input_ids is not None:
        ids = body.input_ids
        batched = _batched_ids(ids)
        rows = [check_prompt(row, ctx.limits) for row in (ids if batched else [ids])]
        return rows, batched or isinstance(body.text, list)
    assert body.text is not None  # _prompt_count checked
    texts = body.text if isinstance(body.text, list) else [body.text]
    encoded = await ctx.encode(texts)
    if any(not row for row in encoded):
        raise RequestRejected(400, "The text of a prompt tokenizes to no tokens.")
    return encoded, isinstance(body.text, list)


async def build_requests(body: GenerateRequest, ctx: ServerContext) -> tuple[list[Request], bool]:
    """Validated scheduler requests (prompt-major) and whether to answer with a list."""
    count = _prompt_count(body)
    params = _per_item(body.sampling_params or SamplingParamsBody(), count, "sampling_params")
    if len({p.n for p in params}) > 1:
        raise RequestRejected(400, "n must be equal across the sampling_params of a batch.")
    n = params[0].n
    check_counts(count, n, ctx.limits)
    prompts, batched = await _prompts(body, ctx)
    wants = _per_item(body.return_logprob, count, "return_logprob")
    starts = _per_item(body.logprob_start_len, count, "logprob_start_len")
    tops = _per_item(body.top_logprobs_num, count, "top_logprobs_num")
    ids_lp = body.token_ids_logprob
    nested = bool(ids_lp) and isinstance(ids_lp[0], list)  # type: ignore[index]
    by_ids = _per_item(ids_lp, count, "token_ids_logprob") if nested else [ids_lp] * count
    rids = _rids(body.rid, count, n)
    notifier = Notifier()
    out: list[Request] = []
    # a batch's prompts mostly share one parameter object and one length: validate each
    # distinct combination once (a spec per prompt cost more server CPU than the forward)
    specs: dict[tuple[int, int], SamplingSpec] = {}
    wanted: dict[tuple[Any, ...], LogprobRequest] = {}
    for i, prompt in enumerate(prompts):
        length = len(prompt)
        spec = specs.get((id(params[i]), length))
        if spec is None:
            spec = specs[id(params[i]), length] = sampling_spec(params[i], length, ctx.limits)
        key = (bool(wants[i]), starts[i], tops[i], id(by_ids[i]), length)
        logprobs = wanted.get(key)
        if logprobs is None:
            logprobs = wanted[key] = logprob_request(
                bool(wants[i]), starts[i], tops[i], by_ids[i], length, ctx.limits
            )
        for _ in range(n):
            out.append(
                Request(
                    rid=rids[len(out)],
                    prompt_ids=prompt,
                    sampling=spec,
                    logprobs=logprobs,
                    stream=body.stream,
                    stream_interval=params[i].stream_interval or 1,
                    notifier=notifier,
                    index=len(out),
                )
            )
    return out, batched or n > 1


def _rids(rid: str | list[str] | None, count: int, n: int) -> list[str]:
    if n > 1 or rid is None:
        return [new_rid() for _ in range(count * n)]
    if isinstance(rid, list):
        if len(rid) != count:
            raise RequestRejected(400, f"rid has {len(rid)} entries for {count} prompts.")
        return list(rid)
    return [rid] if count == 1 else [f"{rid}_{i}" for i in range(count)]


def _triples(entries: Sequence[LogprobEntry], ctx: ServerContext, text: bool) -> list[list[Any]]:
    return [[lp, tok, ctx.token_text(tok) if text else None] for lp, tok in entries]


def _nested(
    rows: Sequence[Sequence[LogprobEntry] | None], ctx: ServerContext, text: bool
) -> list[list[list[Any]] | None]:
    return [None if row is None else _triples(row, ctx, text) for row in rows]


def _logprob_meta(req: Request, ctx: ServerContext, text: bool) -> dict[str, Any]:
    inputs = req.input_logprobs
    meta: dict[str, Any] = {
        "input_token_logprobs": _triples(inputs.tokens, ctx, text) if inputs else [],
        "output_token_logprobs": _triples(req.output_logprobs, ctx, text),
        "output_token_logprobs_length": len(req.output_logprobs),
    }
    if req.logprobs.top_n > 0:
        meta["input_top_logprobs"] = _nested(inputs.top, ctx, text) if inputs else []
        meta["output_top_logprobs"] = _nested(req.output_top, ctx, text)
    if req.logprobs.token_ids:
        meta["input_token_ids_logprobs"] = _nested(inputs.by_ids, ctx, text) if inputs else []
        meta["output_token_ids_logprobs"] = _nested(req.output_by_ids, ctx, text)
    return meta


def payload(
    req: Request, ctx: ServerContext, *, logprob_text: bool = False, prompt_ids: bool = False
) -> dict[str, Any]:
    """SGLang's response object for one request (cumulative, also used for stream chunks)."""
    meta: dict[str, Any] = {"id": req.rid, "finish_reason": req.finish}
    aborted_waiting = (
        req.finish is not None and req.finish.get("message") == "Abort in waiting queue"
    )
    if not aborted_waiting:
        meta["prompt_tokens"] = len(req.prompt_ids)
        meta["cached_tokens"] = 0
    meta["completion_tokens"] = len(req.output_ids)
    meta["reasoning_tokens"] = 0
    meta["num_retractions"] = req.retractions
    meta["weight_version"] = req.weight_version or ctx.scheduler.weight_version
    if req.logprobs.enabled:
        meta.update(_logprob_meta(req, ctx, logprob_text))
    if req.finished:
        meta["e2e_latency"] = req.e2e_latency
        meta["response_sent_to_client_ts"] = time.time()
        meta["weight_versions"] = [dict(span) for span in req.weight_versions]
    out: dict[str, Any] = {"text": req.text, "output_ids": list(req.output_ids), "meta_info": meta}
    if prompt_ids:
        out["prompt_token_ids"] = list(req.prompt_ids)
    return out


async def _native_stream(
    requests: list[Request], batched: bool, body: GenerateRequest, ctx: ServerContext
) -> AsyncGenerator[bytes, None]:
    try:
        async for changed in updates(requests):
            for req in changed:
                chunk = payload(
                    req,
                    ctx,
                    logprob_text=body.return_text_in_logprobs,
                    prompt_ids=body.return_prompt_token_ids,
                )
                if batched:
                    chunk["index"] = req.index
                yield sse(chunk)
    finally:
        abort_unfinished(requests, ctx.scheduler)
    yield DONE


async def handle_generate(http: HttpRequest, ctx: ServerContext) -> ASGIApp:
    try:
        body = decode_json(await http.body(), GenerateRequest)
    except JsonError as err:
        return schema_error(str(err))
    try:
        requests, batched = await build_requests(body, ctx)
        await ctx.scheduler.submit(requests)
    except RequestRejected as err:
        return native_error(err.status_code, err.message)
    except EngineUnavailable as err:
        return unavailable(str(err))
    if body.stream:
        return EventStreamResponse(_native_stream(requests, batched, body, ctx))

    def build() -> Response:
        text, prompt_ids = body.return_text_in_logprobs, body.return_prompt_token_ids
        results = [payload(r, ctx, logprob_text=text, prompt_ids=prompt_ids) for r in requests]
        return json_response(results if batched else results[0])

    return WhenFinished(requests, ctx.scheduler, build, ctx.watch)
