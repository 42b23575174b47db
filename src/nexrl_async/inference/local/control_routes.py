"""Control and info routes: pause / continue / abort, weight updates, cache, health, info."""

from __future__ import annotations

import time
from typing import Any, TypeVar

import anyio
from starlette.requests import Request as HttpRequest
from starlette.responses import PlainTextResponse, Response

from nexrl_async.__about__ import __version__
from nexrl_async.core.errors import EngineUnavailable
from nexrl_async.inference.local.app_state import ServerContext
from nexrl_async.inference.local.error_responses import json_response, unparseable_body
from nexrl_async.inference.local.http_io import JsonError, decode_json
from nexrl_async.inference.local.protocol import (
    AbortRequest,
    ContinueRequest,
    PauseRequest,
    UpdateWeightsFromDiskRequest,
    UpdateWeightsFromSharedMemoryRequest,
    new_rid,
)
from nexrl_async.inference.local.request import Request
from nexrl_async.inference.local.sampling import SamplingSpec

T = TypeVar("T")

HEALTH_TIMEOUT_S = 20.0
"""SGLang's ``SGLANG_HEALTH_CHECK_TIMEOUT``."""

_FLUSHED = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or "
    "waiting requests, the operation will not be performed.)\n"
)


class BodyError(Exception):
    """A control body that does not decode (answered with SGLang's 400 envelope)."""

    def __init__(self, response: Response) -> None:
        self.response = response


async def decode_body(http: HttpRequest, kind: type[T]) -> T:
    """The JSON body as ``kind`` (an empty body is ``{}``); malformed, too deeply nested or
    off-schema bodies raise :class:`BodyError` with SGLang's 400 envelope."""
    raw = await http.body()
    try:
        return decode_json(raw or b"{}", kind)
    except JsonError as err:
        raise BodyError(unparseable_body(str(err))) from err


async def pause_generation(http: HttpRequest, ctx: ServerContext) -> Response:
    body = await decode_body(http, PauseRequest)
    await ctx.scheduler.pause(body.mode)
    return json_response({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(http: HttpRequest, ctx: ServerContext) -> Response:
    await decode_body(http, ContinueRequest)
    ctx.scheduler.resume()
    return json_response({"message": "Generation continued successfully.", "status": "ok"})


async def abort_request(http: HttpRequest, ctx: ServerContext) -> Response:
    body = await decode_body(http, AbortRequest)
    if body.abort_all:
        ctx.scheduler.abort(None)
    elif body.rid:
        ctx.scheduler.abort(body.rid)
    return Response(status_code=200)


async def update_weights_from_disk(http: HttpRequest, ctx: ServerContext) -> Response:
    body = await decode_body(http, UpdateWeightsFromDiskRequest)
    ok, message = await ctx.scheduler.update_weights(
        body.model_path,
        body.weight_version,
        abort_all=body.abort_all_requests,
        flush_cache=body.flush_cache,
    )
    content = {"success": ok, "message": message, "num_paused_requests": 0}
    return json_response(content, 200 if ok else 400)


async def update_weights_from_shared_memory(http: HttpRequest, ctx: ServerContext) -> Response:
    """Our server only: the whole weights from a shared-memory staging file of this host."""
    body = await decode_body(http, UpdateWeightsFromSharedMemoryRequest)
    ok, message = await ctx.scheduler.update_from_staging(
        body.layout, body.weight_version, in_place=body.in_place
    )
    return json_response({"success": ok, "message": message}, 200 if ok else 400)


async def flush_cache(http: HttpRequest, ctx: ServerContext) -> Response:
    """No prefix cache to drop, but SGLang's contract holds: only an idle server flushes."""
    try:
        timeout_s = float(http.query_params.get("timeout", "0"))
    except ValueError:
        return PlainTextResponse("timeout must be a number.", 400)
    scheduler = ctx.scheduler
    if not scheduler.cache_flushable():
        if timeout_s <= 0:
            return PlainTextResponse(
                "Cache not flushed because there are pending requests.", status_code=400
            )
        if not await scheduler.wait_until(scheduler.cache_flushable, timeout_s):
            return PlainTextResponse("Timed out waiting for idle state.", status_code=400)
    return PlainTextResponse(_FLUSHED)


async def health(http: HttpRequest, ctx: ServerContext) -> Response:
    """200 once a 1-token generation completes (or the server is busy or paused)."""
    scheduler = ctx.scheduler
    if ctx.shutting_down:
        return Response(status_code=503)
    if not scheduler.idle or scheduler.paused is not None:
        return Response(status_code=200)
    bos = ctx.tokenizer.bos_token_id
    probe = Request(
        rid=f"HEALTH_CHECK_{new_rid()}",
        prompt_ids=[int(bos if bos is not None else 0)],
        sampling=SamplingSpec(max_new_tokens=1, temperature=0.0),
    )
    with anyio.move_on_after(HEALTH_TIMEOUT_S):
        try:
            await scheduler.submit([probe])
        except EngineUnavailable:
            return Response(status_code=503)
        await probe.done.wait()
        return Response(status_code=200)
    scheduler.abort(probe.rid)
    return Response(status_code=503)


def model_info(ctx: ServerContext) -> dict[str, Any]:
    return {
        "model_path": ctx.scheduler.model_path,
        "served_model_name": ctx.model_name,
        "tokenizer_path": ctx.tokenizer_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": ctx.scheduler.weight_version,
        "load_format": "auto",
        "reasoning_parser": None,
        "tool_call_parser": None,
        "disaggregation_mode": "null",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": ctx.model_type,
        "architectures": ctx.architectures,
    }


def server_info(ctx: ServerContext) -> dict[str, Any]:
    scheduler = ctx.scheduler
    stats = scheduler.stats
    state = {
        **scheduler.loads,
        "paused": scheduler.paused,
        "decode_steps": stats.steps,
        "generated_tokens": stats.generated_tokens,
        "max_batch_size": stats.max_batch_size,
        "batch_size_histogram": {str(k): v for k, v in sorted((stats.batch_sizes or {}).items())},
    }
    return {
        **ctx.server_args,
        "model_path": scheduler.model_path,
        "served_model_name": ctx.model_name,
        "weight_version": scheduler.weight_version,
        "context_length": ctx.limits.context_length,
        "max_req_input_len": ctx.limits.context_length - 1,
        "tp_size": 1,
        "dp_size": 1,
        "internal_states": [state],
        "version": f"nexrl_async-{__version__}",
    }


def loads(ctx: ServerContext) -> dict[str, Any]:
    return {
        "timestamp": time.time(),
        "version": f"nexrl_async-{__version__}",
        "loads": [{"dp_rank": 0, **ctx.scheduler.loads}],
    }
