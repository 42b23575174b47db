"""Routes of distributed weight updates (docs/sglang_api.md §4, SGLang 0.5.23 semantics).

::

    POST /init_weights_update_group       join the trainer's group as rank ``rank_offset``
    POST /begin_weight_update             open the update session (0.5.23 requires one)
    POST /update_weights_from_distributed receive ``names`` from rank 0, load them between steps
    POST /end_weight_update               close the session
    POST /destroy_weights_update_group    leave the group (a pending receive stops)

Each answers ``{success, message}``: 200 on success, 400 on failure. ``init`` and ``update`` block
until their collective completes (the trainer fires them concurrently with its side); the
collectives run in worker threads, never on the event loop. A received bucket is loaded like a
disk update: once no request runs (or while paused), under the scheduler's step limiter.
"""

from __future__ import annotations

from functools import partial

import anyio
import anyio.to_thread
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from nexrl_async.core.errors import WeightSyncError
from nexrl_async.inference.local.app_state import ServerContext
from nexrl_async.inference.local.control_routes import decode_body
from nexrl_async.inference.local.error_responses import json_response
from nexrl_async.inference.local.protocol import (
    BeginWeightUpdateRequest,
    GroupNameRequest,
    InitWeightsUpdateGroupRequest,
    UpdateWeightsFromDistributedRequest,
)
from nexrl_async.inference.local.update_group import (
    FLATTENED,
    TensorSpec,
    UpdateGroup,
    parse_dtype,
)

NEEDS_SESSION = (
    "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
)
_PARTIAL = (
    "The full weights of the ModelRunner are partially updated. Please discard the whole weights."
)


def _result(ok: bool, message: str) -> Response:
    return json_response({"success": ok, "message": message}, 200 if ok else 400)


async def init_weights_update_group(http: HttpRequest, ctx: ServerContext) -> Response:
    body = await decode_body(http, InitWeightsUpdateGroupRequest)
    groups = ctx.weight_sync.groups
    try:
        port = int(body.master_port)
        token = groups.reserve(body.group_name)
    except (ValueError, WeightSyncError) as err:
        return _result(False, f"Failed to initialize custom process group: {err}")
    joined: UpdateGroup | None = None
    join = partial(
        groups.join,
        body.group_name,
        master_address=body.master_address,
        master_port=port,
        rank=body.rank_offset,
        world_size=body.world_size,
        backend=body.backend,
    )
    try:
        joined = await anyio.to_thread.run_sync(join, abandon_on_cancel=True)
    except WeightSyncError as err:
        return _result(False, f"Failed to initialize custom process group: {err}")
    finally:
        kept = groups.register(body.group_name, token, joined)
    if not kept:
        message = f"Process group {body.group_name} was destroyed while joining."
        return _result(False, f"Failed to initialize custom process group: {message}")
    return _result(True, "Succeeded to initialize custom process group.")


async def destroy_weights_update_group(http: HttpRequest, ctx: ServerContext) -> Response:
    body = await decode_body(http, GroupNameRequest)
    try:
        ctx.weight_sync.groups.leave(body.group_name)
    except WeightSyncError as err:
        return _result(False, str(err))
    return _result(True, "Succeeded to destroy custom process group.")


async def begin_weight_update(http: HttpRequest, ctx: ServerContext) -> Response:
    await decode_body(http, BeginWeightUpdateRequest)
    if ctx.weight_sync.session_open:
        return _result(False, "a weight-update session is already open")
    ctx.weight_sync.session_open = True
    return _result(True, "Weight-update session opened.")


async def end_weight_update(http: HttpRequest, ctx: ServerContext) -> Response:
    await http.body()
    if not ctx.weight_sync.session_open:
        return _result(False, "no weight-update session is open")
    ctx.weight_sync.session_open = False
    return _result(True, "Weight-update session closed.")


def _specs(body: UpdateWeightsFromDistributedRequest) -> list[TensorSpec]:
    if not len(body.names) == len(body.dtypes) == len(body.shapes):
        raise ValueError("names, dtypes and shapes must have the same length.")
    if body.load_format not in (None, FLATTENED):
        raise ValueError(f"load_format {body.load_format!r} is not supported (null or {FLATTENED})")
    if any(size < 0 for shape in body.shapes for size in shape):
        raise ValueError("shapes must not have negative sizes.")
    return [
        TensorSpec(name, parse_dtype(dtype), tuple(shape))
        for name, dtype, shape in zip(body.names, body.dtypes, body.shapes, strict=True)
    ]


async def update_weights_from_distributed(http: HttpRequest, ctx: ServerContext) -> Response:
    body = await decode_body(http, UpdateWeightsFromDistributedRequest)
    sync = ctx.weight_sync
    try:
        specs = _specs(body)
        group = sync.groups.get(body.group_name)
    except (ValueError, WeightSyncError) as err:
        return _result(False, str(err))
    if not sync.session_open:
        return _result(False, NEEDS_SESSION)
    async with sync.lock:
        if body.abort_all_requests:
            ctx.scheduler.abort(None)
        receive = partial(group.receive, specs, load_format=body.load_format)
        try:
            received = await anyio.to_thread.run_sync(receive)
        except WeightSyncError as err:
            return _result(False, f"Failed to update parameter online: {err}. {_PARTIAL}")
        ok, message = await ctx.scheduler.update_tensors(
            dict(received),
            body.weight_version,
            abort_all=body.abort_all_requests,
            flush_cache=body.flush_cache,
        )
    return _result(ok, message)
