"""Control endpoints of one SGLang server: health, info, scheduling, memory, weights.

docs/sglang_api.md §4 is the contract. ``{success, message}`` endpoints that answer
``success: false`` raise :class:`RequestRejected` whatever the HTTP status (SGLang uses both 200
and 400 for it). Weight and group endpoints are never retried here: the caller (the weight
publisher) owns the retry budget of a publication step, and a repeated distributed update would
desynchronise the broadcast. The ``begin/end_weight_update`` session exists from SGLang 0.5.23;
on older servers the routes 404, which is remembered and treated as "no session needed".
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar

import anyio
import httpx
import msgspec
from loguru import logger

from nexrl_async.config.inference import InferenceConfig
from nexrl_async.core.errors import GenerationError, InferenceError, RequestRejected
from nexrl_async.inference.client.http import Http
from nexrl_async.inference.client.retry import RetryPolicy
from nexrl_async.inference.client.structs import (
    ControlResult,
    MemoryTag,
    ModelInfo,
    PauseMode,
    ServerInfo,
    StreamMode,
    WeightUpdateResult,
)
from nexrl_async.inference.client.transport import Transport

T = TypeVar("T")
R = TypeVar("R", ControlResult, WeightUpdateResult)

_SERVER_INFO_FIELDS = tuple(f for f in ServerInfo.__struct_fields__ if f != "raw")


class ServerControl:
    """Connection settings and the control endpoints of one server at ``base_url``.

    :class:`nexrl_async.inference.client.sglang.SGLangClient` adds generation on top; code that only
    manages servers (the fleet, the weight publisher) may type against this class.
    """

    def __init__(
        self,
        base_url: str,
        *,
        http: Http,
        api_key: str | None = None,
        request_timeout_s: float = 300.0,
        control_timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        retries: int = 3,
        backoff: RetryPolicy | None = None,
        abort_grace_s: float = 2.0,
        stream_mode: StreamMode = "auto",
        seed: int | None = None,
    ) -> None:
        policy = (backoff or RetryPolicy()).with_retries(retries)
        self._transport = Transport(
            base_url,
            http=http,
            api_key=api_key,
            connect_timeout_s=connect_timeout_s,
            retry=policy,
            rng=random.Random(seed),
        )
        self.request_timeout_s = request_timeout_s
        self.control_timeout_s = control_timeout_s
        self.abort_grace_s = abort_grace_s
        self.stream_mode: StreamMode = stream_mode
        self.has_weight_update_session: bool | None = None
        """Whether the server has ``/begin_weight_update`` (``None`` until first asked)."""

    @classmethod
    def from_config(cls, base_url: str, config: InferenceConfig, *, http: Http) -> Self:
        """A client with the ``[inference]`` section's key, deadlines and retry budget."""
        return cls(
            base_url,
            http=http,
            api_key=config.api_key,
            request_timeout_s=config.request_timeout_s,
            connect_timeout_s=config.connect_timeout_s,
            retries=config.retries,
        )

    @property
    def base_url(self) -> str:
        return self._transport.base_url

    # ------------------------------------------------------------------ health and info

    async def health(self, *, timeout_s: float | None = None) -> bool:
        """``GET /health`` answered 200 (False on 503, transport errors, timeouts)."""
        return await self._probe("/health", timeout_s)

    async def health_generate(self, *, timeout_s: float | None = None) -> bool:
        """``GET /health_generate`` (runs a 1-token generation) answered 200."""
        return await self._probe("/health_generate", timeout_s)

    async def _probe(self, path: str, timeout_s: float | None) -> bool:
        try:
            response = await self._transport.request(
                "GET", path, timeout_s=timeout_s or self.control_timeout_s, retries=0
            )
        except InferenceError as err:
            logger.debug("{} {}: {}", self.base_url, path, err)
            return False
        return response.status_code == 200

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        """``GET /model_info``, falling back to the older ``/get_model_info`` on 404."""
        body = await self._get_with_alias("/model_info", "/get_model_info", timeout_s)
        return _decode(body, ModelInfo, "/model_info")

    async def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        """``GET /server_info``, falling back to ``/get_server_info`` on 404."""
        body = await self._get_with_alias("/server_info", "/get_server_info", timeout_s)
        raw = _decode(body, dict[str, Any], "/server_info")
        states = raw.get("internal_states")
        first = states[0] if isinstance(states, list) and states else {}
        first = first if isinstance(first, dict) else {}
        known = {k: raw.get(k, first.get(k)) for k in _SERVER_INFO_FIELDS}
        try:
            return msgspec.convert({**known, "raw": raw}, ServerInfo)
        except msgspec.ValidationError as err:
            raise GenerationError(f"malformed /server_info payload: {err}") from err

    async def _get_with_alias(self, path: str, alias: str, timeout_s: float | None) -> bytes:
        timeout = timeout_s or self.control_timeout_s
        try:
            response = await self._transport.request("GET", path, timeout_s=timeout)
        except RequestRejected as err:
            if err.status_code != 404:
                raise
            response = await self._transport.request("GET", alias, timeout_s=timeout)
        return response.content

    # ------------------------------------------------------------------ scheduling control

    async def flush_cache(
        self, *, server_wait_s: float | None = None, timeout_s: float | None = None
    ) -> str:
        """``POST /flush_cache``; 400 (server busy) raises :class:`RequestRejected`.

        ``server_wait_s`` asks 0.5.23 servers to wait that long for idleness (``?timeout=``).
        """
        params = None if server_wait_s is None else {"timeout": f"{server_wait_s:g}"}
        response = await self._transport.request(
            "POST", "/flush_cache", params=params, timeout_s=timeout_s or self.control_timeout_s
        )
        return response.text

    async def pause_generation(
        self, mode: PauseMode = "abort", *, timeout_s: float | None = None
    ) -> None:
        """``POST /pause_generation``: ``abort`` ends in-flight requests (200 + abort finish),
        ``retract`` requeues them, ``in_place`` freezes them; new requests block until
        :meth:`continue_generation`."""
        await self._post("/pause_generation", {"mode": mode}, timeout_s)

    async def continue_generation(
        self, *, torch_empty_cache: bool | None = None, timeout_s: float | None = None
    ) -> None:
        """``POST /continue_generation``."""
        body = {} if torch_empty_cache is None else {"torch_empty_cache": torch_empty_cache}
        await self._post("/continue_generation", body, timeout_s)

    async def abort_request(
        self,
        rid: str | None = None,
        *,
        abort_all: bool = False,
        timeout_s: float | None = None,
    ) -> None:
        """``POST /abort_request`` for the exact ``rid`` (unknown rids are ignored by the
        server) or, with ``abort_all``, every request."""
        if not rid and not abort_all:
            raise ValueError("abort_request needs a rid or abort_all=True")
        body = {"rid": rid or "", "abort_all": abort_all}
        await self._post("/abort_request", body, timeout_s, retries=0)

    async def release_memory_occupation(
        self, tags: Sequence[MemoryTag] | None = None, *, timeout_s: float | None = None
    ) -> None:
        """Free GPU memory (``tags`` None = all); the server must be idle."""
        await self._post("/release_memory_occupation", {"tags": _tags(tags)}, timeout_s)

    async def resume_memory_occupation(
        self, tags: Sequence[MemoryTag] | None = None, *, timeout_s: float | None = None
    ) -> None:
        """Re-allocate what :meth:`release_memory_occupation` freed."""
        await self._post("/resume_memory_occupation", {"tags": _tags(tags)}, timeout_s)

    # ------------------------------------------------------------------ weights

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str | int | None = None,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        load_format: str | None = None,
        timeout_s: float | None = None,
    ) -> WeightUpdateResult:
        """Load weights from ``model_path`` (a directory the server can read). Not retried."""
        body = {
            "model_path": model_path,
            "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests,
            **_optional(weight_version=_label(weight_version), load_format=load_format),
        }
        response = await self._post("/update_weights_from_disk", body, timeout_s, retries=0)
        return _checked(response, WeightUpdateResult, "/update_weights_from_disk")

    async def update_weights_from_shared_memory(
        self,
        layout: msgspec.Struct,
        *,
        weight_version: str | int | None = None,
        in_place: bool = True,
        timeout_s: float | None = None,
    ) -> ControlResult:
        """Our local server only: swap in every weight of a staging file of this host
        (``inference/staging.py``'s ``Layout``), in place between two decode steps. Not retried."""
        body = {"layout": layout, "in_place": in_place, "weight_version": _label(weight_version)}
        return await self._control("/update_weights_from_shared_memory", body, timeout_s)

    async def update_weight_version(
        self,
        new_version: str | int,
        *,
        abort_all_requests: bool = False,
        timeout_s: float | None = None,
    ) -> ControlResult:
        """Relabel the current weights (SGLang's default would abort all requests)."""
        body = {"new_version": str(new_version), "abort_all_requests": abort_all_requests}
        return await self._control("/update_weight_version", body, timeout_s)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        *,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
        timeout_s: float | None = None,
    ) -> ControlResult:
        """Join the trainer's broadcast group; blocks until the collective init completes, so
        run it concurrently with the trainer's side."""
        body = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }
        return await self._control("/init_weights_update_group", body, timeout_s)

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        *,
        group_name: str = "weight_update_group",
        weight_version: str | int | None = None,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        load_format: str | None = None,
        timeout_s: float | None = None,
    ) -> ControlResult:
        """Receive one bucket of tensors broadcast by rank 0, in exactly ``names`` order."""
        body = {
            "names": list(names),
            "dtypes": list(dtypes),
            "shapes": [list(s) for s in shapes],
            "group_name": group_name,
            "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests,
            **_optional(weight_version=_label(weight_version), load_format=load_format),
        }
        return await self._control("/update_weights_from_distributed", body, timeout_s)

    async def destroy_weights_update_group(
        self, group_name: str = "weight_update_group", *, timeout_s: float | None = None
    ) -> ControlResult:
        """Leave the broadcast group."""
        body = {"group_name": group_name}
        return await self._control("/destroy_weights_update_group", body, timeout_s)

    async def begin_weight_update(
        self, selector: str = "all", *, timeout_s: float | None = None
    ) -> bool:
        """Open a weight-update session (SGLang ≥ 0.5.23). Returns False, and remembers it,
        when the server has no such route (404: older SGLang, where none is needed)."""
        return await self._session_call("/begin_weight_update", {"selector": selector}, timeout_s)

    async def end_weight_update(self, *, timeout_s: float | None = None) -> bool:
        """Close the session; False when the server has no sessions."""
        return await self._session_call("/end_weight_update", {}, timeout_s)

    @asynccontextmanager
    async def weight_update_session(
        self, selector: str = "all", *, timeout_s: float | None = None
    ) -> AsyncIterator[bool]:
        """``begin`` … ``end`` around tensor/distributed updates; yields whether the server
        has sessions. ``end`` runs (shielded) even when the body fails."""
        opened = await self.begin_weight_update(selector, timeout_s=timeout_s)
        try:
            yield opened
        finally:
            if opened:
                with anyio.CancelScope(shield=True):
                    await self.end_weight_update(timeout_s=timeout_s)

    async def _session_call(self, path: str, body: dict[str, Any], timeout_s: float | None) -> bool:
        if self.has_weight_update_session is False:
            return False
        try:
            await self._control(path, body, timeout_s)
        except RequestRejected as err:
            if err.status_code != 404:
                raise
            logger.info("{} has no {} (SGLang < 0.5.23): no session needed", self.base_url, path)
            self.has_weight_update_session = False
            return False
        self.has_weight_update_session = True
        return True

    # ------------------------------------------------------------------ plumbing

    async def _abort_quietly(self, *rids: str) -> None:
        """Best-effort ``/abort_request`` of ``rids``, concurrently, shielded from cancellation
        and bounded by ``abort_grace_s`` in all; failures are only logged."""

        async def abort_one(rid: str) -> None:
            try:
                await self.abort_request(rid, timeout_s=self.abort_grace_s)
            except InferenceError as err:
                logger.debug("abort of {} on {} failed: {}", rid, self.base_url, err)

        with anyio.CancelScope(shield=True), anyio.move_on_after(self.abort_grace_s):
            async with anyio.create_task_group() as group:
                for rid in rids:
                    group.start_soon(abort_one, rid)

    async def _post(
        self,
        path: str,
        body: Any,
        timeout_s: float | None,
        *,
        retries: int | None = None,
    ) -> httpx.Response:
        return await self._transport.request(
            "POST", path, body=body, timeout_s=timeout_s or self.control_timeout_s, retries=retries
        )

    async def _control(self, path: str, body: Any, timeout_s: float | None) -> ControlResult:
        """A ``{success, message}`` endpoint; not retried (the caller owns the step's budget)."""
        response = await self._post(path, body, timeout_s, retries=0)
        return _checked(response, ControlResult, path)


def _decode(body: bytes, type_: type[T], path: str) -> T:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.DecodeError as err:
        raise GenerationError(f"malformed {path} payload: {err}") from err


def _checked(response: httpx.Response, type_: type[R], path: str) -> R:
    result = _decode(response.content, type_, path)
    if not result.success:
        raise RequestRejected(response.status_code, result.message, url=str(response.url))
    return result


def _label(version: str | int | None) -> str | None:
    return None if version is None else str(version)


def _optional(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _tags(tags: Sequence[MemoryTag] | None) -> list[str] | None:
    return None if tags is None else list(tags)
