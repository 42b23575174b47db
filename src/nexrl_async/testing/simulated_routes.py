"""Control routes of the simulated SGLang server (docs/sglang_api.md §4) and its ``/_sim`` hooks.

``/_sim/faults`` (POST: set :class:`Faults` fields) and ``/_sim/stats`` (GET) let tests and
benchmarks that run the server as a subprocess inject failures and read what it saw.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from nexrl_async.testing.simulated_engine import SimulatedEngine
from nexrl_async.testing.simulated_generate import generate
from nexrl_async.testing.simulated_responses import (
    bad_request,
    json_response,
    read_json,
    success,
    value_error,
)

Handler = Callable[[Request], Awaitable[Response]]
_FLUSHED = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or "
    "waiting requests, the operation will not be performed.)\n"
)
_NOT_FLUSHED_AFTER_UPDATE = (
    "Weights were updated, but the cache was not flushed because requests are still running "
    "or queued. Pause generation in a mode that empties the running batch, or pass "
    "flush_cache=false."
)
_MEMORY_TAGS = frozenset({"kv_cache", "weights", "cuda_graph"})


def _engine(request: Request) -> SimulatedEngine:
    engine: SimulatedEngine = request.app.state.engine
    return engine


async def _body(request: Request) -> dict[str, Any] | Response:
    body = await read_json(request)
    if isinstance(body, Response):
        return body
    if not isinstance(body, dict):
        return bad_request("The request body must be a JSON object.")
    return body


def _label(value: Any) -> str | None:
    return None if value is None else str(value)


async def health(request: Request) -> Response:
    return Response(status_code=503 if _engine(request).faults.unhealthy else 200)


async def model_info(request: Request) -> Response:
    engine = _engine(request)
    return json_response(
        {
            "model_path": engine.model_path,
            "served_model_name": engine.model_path,
            "tokenizer_path": engine.config.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
            "load_format": "auto",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "simulated",
            "architectures": ["SimulatedForCausalLM"],
        }
    )


async def server_info(request: Request) -> Response:
    engine = _engine(request)
    config = engine.config
    state = {
        "max_req_input_len": config.context_length - 1,
        "weight_version": engine.weight_version,
    }
    return json_response(
        {
            "model_path": engine.model_path,
            "tp_size": 1,
            "dp_size": 1,
            "context_length": config.context_length,
            "max_total_num_tokens": config.context_length * 64,
            "max_req_input_len": config.context_length - 1,
            "api_key": None,
            "version": "0.5.10-simulated" if config.legacy else "0.5.23-simulated",
            "internal_states": [state],
            "launch_command": "python -m nexrl_async.testing.simulated",
        }
    )


async def loads(request: Request) -> Response:
    engine = _engine(request)
    running = len(engine.running())
    load = {
        "dp_rank": 0,
        "num_running_reqs": running,
        "num_waiting_reqs": len(engine.requests) - running,
    }
    return json_response({"timestamp": time.time(), "loads": [load]})


async def flush_cache(request: Request) -> Response:
    engine = _engine(request)
    wait_s = float(request.query_params.get("timeout", "0") or 0)
    with anyio.move_on_after(wait_s):
        while not engine.can_flush():
            await engine.wait_change(None, control=True)
    if not engine.can_flush():
        text = "Timed out waiting for idle state." if wait_s else "Cache not flushed: busy."
        return PlainTextResponse(text, status_code=400)
    engine.stats.flushes += 1
    return PlainTextResponse(_FLUSHED)


async def pause_generation(request: Request) -> Response:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    mode = body.get("mode", "abort")
    if mode not in ("abort", "retract", "in_place"):
        return bad_request(f"Input should be 'abort', 'retract' or 'in_place', got {mode!r}")
    await _engine(request).pause_generation(mode)
    return json_response({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: Request) -> Response:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    _engine(request).continue_generation()
    return json_response({"message": "Generation continued successfully.", "status": "ok"})


async def abort_request(request: Request) -> Response:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    engine = _engine(request)
    rid, abort_all = str(body.get("rid", "")), bool(body.get("abort_all", False))
    engine.stats.abort_calls.append({"rid": rid, "abort_all": abort_all})
    engine.abort(rid, abort_all=abort_all)
    return Response(status_code=200)


async def _apply_update(
    engine: SimulatedEngine, body: dict[str, Any], *, kind: str, model_path: str | None
) -> Response:
    """The shared tail of disk and distributed updates: lock, fault, swap, flush."""
    await engine.acquire_update(abort_all=bool(body.get("abort_all_requests", False)))
    extra = {"num_paused_requests": 0} if kind == "disk" else {}
    if engine.faults.take("weight_update_failures"):
        return success(False, "Failed to update weights: simulated failure.", **extra)
    version = _label(body.get("weight_version"))
    engine.set_weights(model_path=model_path, version=version)
    engine.stats.weight_updates.append({"kind": kind, "model_path": model_path, "version": version})
    if body.get("flush_cache", True) and not engine.config.legacy:
        if not engine.can_flush():
            return success(False, _NOT_FLUSHED_AFTER_UPDATE, **extra)
        engine.stats.flushes += 1
    message = (
        "Succeeded to update model weights."
        if kind == "disk"
        else "Succeeded to update parameter online."
    )
    return success(True, message, **extra)


async def update_weights_from_disk(request: Request) -> Response:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    model_path = body.get("model_path")
    if not isinstance(model_path, str) or not model_path:
        return bad_request("model_path: Field required")
    return await _apply_update(_engine(request), body, kind="disk", model_path=model_path)


async def update_weights_from_distributed(request: Request) -> Response:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    engine = _engine(request)
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        return bad_request("names, dtypes and shapes: Field required")
    if not len(names) == len(dtypes) == len(shapes):
        return success(False, "names, dtypes and shapes must have the same length.")
    group = str(body.get("group_name", "weight_update_group"))
    if group not in engine.groups:
        return success(False, f"Process group {group} is not initialized.")
    if not engine.config.legacy and not engine.session_open:
        return success(
            False,
            "update_weights_from_distributed must run between begin_weight_update() and "
            "end_weight_update()",
        )
    return await _apply_update(engine, body, kind="distributed", model_path=None)


async def init_weights_update_group(request: Request) -> Response:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    missing = [
        k for k in ("master_address", "master_port", "rank_offset", "world_size") if k not in body
    ]
    if missing:
        return bad_request(f"{', '.join(missing)}: Field required")
    engine = _engine(request)
    group = str(body.get("group_name", "weight_update_group"))
    if group in engine.groups:
        return success(False, f"Process group {group} already exists.")
    engine.groups[group] = int(body["world_size"])
    return success(True, "Succeeded to initialize custom process group.")


async def destroy_weights_update_group(request: Request) -> Response:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    engine = _engine(request)
    group = str(body.get("group_name", "weight_update_group"))
    if engine.groups.pop(group, None) is None:
        return success(False, f"Process group {group} does not exist.")
    return success(True, "Succeeded to destroy custom process group.")


async def begin_weight_update(request: Request) -> Response:
    engine = _engine(request)
    if engine.session_open:
        return success(False, "a weight-update session is already open")
    engine.session_open = True
    return success(True, "Weight-update session opened.")


async def end_weight_update(request: Request) -> Response:
    engine = _engine(request)
    if not engine.session_open:
        return success(False, "no weight-update session is open")
    engine.session_open = False
    return success(True, "Weight-update session closed.")


async def update_weight_version(request: Request) -> Response:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    engine = _engine(request)
    version = body.get("new_version")
    if version is None:
        return bad_request("new_version: Field required")
    if body.get("abort_all_requests", True):
        engine.abort(abort_all=True)
    engine.set_weights(model_path=None, version=str(version))
    return success(True, "Weight version updated.", new_version=str(version))


async def _memory(request: Request, *, release: bool) -> Response:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    engine = _engine(request)
    tags = body.get("tags")
    chosen = set(_MEMORY_TAGS if tags is None else tags)
    if not chosen <= _MEMORY_TAGS:
        return value_error(f"Unknown memory tags: {sorted(chosen - _MEMORY_TAGS)}")
    if release and engine.running():
        return value_error("release_memory_occupation requires an idle server.")
    if release:
        engine.released_tags |= chosen
    else:
        engine.released_tags -= chosen
    return json_response(None)


async def release_memory_occupation(request: Request) -> Response:
    return await _memory(request, release=True)


async def resume_memory_occupation(request: Request) -> Response:
    return await _memory(request, release=False)


async def sim_faults(request: Request) -> Response:
    """Set fault counters, e.g. ``{"fail_generate": 2, "fail_status": 503}``."""
    body = await _body(request)
    if isinstance(body, Response):
        return body
    faults = _engine(request).faults
    names = {f.name for f in dataclasses.fields(faults)}
    unknown = sorted(set(body) - names)
    if unknown:
        return value_error(f"unknown fault fields: {unknown}")
    for name, value in body.items():
        setattr(faults, name, type(getattr(faults, name))(value))
    return json_response(dataclasses.asdict(faults))


async def sim_stats(request: Request) -> Response:
    engine = _engine(request)
    stats = engine.stats.summary()
    stats["in_flight"] = len(engine.requests)
    stats["weight_version"] = engine.weight_version
    stats["paused"] = engine.pause
    return json_response(stats)


def routes(legacy: bool) -> list[Route]:
    """Every route of the server; ``legacy`` drops what SGLang ≤ 0.5.15 lacks."""
    post = ["POST"]
    both = ["GET", "POST"]
    table: list[tuple[str, Handler, list[str]]] = [
        ("/generate", generate, ["POST", "PUT"]),
        ("/health", health, ["GET"]),
        ("/health_generate", health, ["GET"]),
        ("/get_model_info", model_info, ["GET"]),
        ("/get_server_info", server_info, ["GET"]),
        ("/v1/loads", loads, ["GET"]),
        ("/flush_cache", flush_cache, both),
        ("/pause_generation", pause_generation, post),
        ("/continue_generation", continue_generation, post),
        ("/abort_request", abort_request, post),
        ("/update_weights_from_disk", update_weights_from_disk, post),
        ("/update_weights_from_distributed", update_weights_from_distributed, post),
        ("/init_weights_update_group", init_weights_update_group, post),
        ("/destroy_weights_update_group", destroy_weights_update_group, post),
        ("/update_weight_version", update_weight_version, post),
        ("/release_memory_occupation", release_memory_occupation, both),
        ("/resume_memory_occupation", resume_memory_occupation, both),
        ("/_sim/faults", sim_faults, post),
        ("/_sim/stats", sim_stats, ["GET"]),
    ]
    if not legacy:
        table += [
            ("/model_info", model_info, ["GET"]),
            ("/server_info", server_info, ["GET"]),
            ("/begin_weight_update", begin_weight_update, post),
            ("/end_weight_update", end_weight_update, post),
        ]
    return [Route(path, handler, methods=methods) for path, handler, methods in table]
