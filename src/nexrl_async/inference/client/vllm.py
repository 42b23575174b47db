"""Async client for one vLLM server (docs/vllm.md is the contract): a :class:`GenerationBackend`.

Generation is vLLM's token-in/token-out route, ``POST /inference/v1/generate`` (the server runs
with ``--enable-scale-out``): our :class:`SamplingParams` mapped by ``vllm_wire``, the sampled
token's log-prob per token, ``weight_versions`` spans per choice. A group's samples are one
request with ``n`` (child ``j`` of a seeded request uses seed ``s + j``); one id aborts them all.

Control uses the RL routes of a dev-mode server (``VLLM_SERVER_DEV_MODE=1``): ``/pause`` with
``mode=abort`` (running requests end with their partial output) or ``keep`` (frozen in place),
``/resume``, ``/abort_requests`` with the server-side id, ``/weight_info`` and
``/update_weight_version`` for the label, ``/reset_prefix_cache``. A disk load is
``/collective_rpc reload_weights`` of the folder (docs/vllm.md §6.1; exact only for models with
untied embeddings on CPU), done while the server is paused: when the publisher has not paused it
(``weights.inflight = "drain"``) the load pauses with ``mode=wait`` itself (in-flight requests
finish on the old weights) and resumes after relabelling. vLLM 0.32 has no weight-transfer
engine that works on CPU, so there is no distributed transport for vLLM.

Every call runs under a deadline through the shared :class:`Transport` (retries of transport
errors and 502/503/504; 4xx raise ``RequestRejected``). Cancelling a generation, or its
deadline passing, aborts it on the server within ``abort_grace_s``.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Sequence
from typing import Any, Self, TypeVar

import anyio
import httpx
import msgspec
from loguru import logger

from nexrl_async.config.inference import InferenceConfig
from nexrl_async.core.errors import (
    EngineUnavailable,
    GenerationError,
    InferenceError,
    RequestRejected,
)
from nexrl_async.inference.client.http import Http
from nexrl_async.inference.client.retry import RetryPolicy
from nexrl_async.inference.client.sglang import new_rid
from nexrl_async.inference.client.stream import attempt_rid
from nexrl_async.inference.client.structs import (
    ControlResult,
    GenerateResult,
    ModelInfo,
    PauseMode,
    SamplingParams,
    WeightUpdateResult,
)
from nexrl_async.inference.client.transport import Transport
from nexrl_async.inference.client.vllm_wire import (
    SERVER_RID_PREFIX,
    UnsupportedSampling,
    choice_results,
    decode_generate,
    vllm_sampling,
)

T = TypeVar("T")

GENERATE = "/inference/v1/generate"
_PAUSE_MODES: dict[str, str] = {"abort": "abort", "in_place": "keep"}
"""Our pause mode → vLLM's (``retract`` has no vLLM equivalent)."""

__all__ = ["GENERATE", "UnsupportedSampling", "VLLMClient"]


class _WeightInfo(msgspec.Struct, kw_only=True):
    weight_version: str | int | None = None


class _Models(msgspec.Struct, kw_only=True):
    data: list[dict[str, Any]] = []


class VLLMClient:
    """Client of one vLLM server at ``base_url`` (see the module docstring)."""

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
        seed: int | None = None,
    ) -> None:
        self._transport = Transport(
            base_url,
            http=http,
            api_key=api_key,
            connect_timeout_s=connect_timeout_s,
            retry=(backoff or RetryPolicy()).with_retries(retries),
            rng=random.Random(seed),
        )
        self.request_timeout_s = request_timeout_s
        self.control_timeout_s = control_timeout_s
        self.abort_grace_s = abort_grace_s
        self.paused = False
        """Whether this client paused the server (and has not resumed it since)."""
        self._model_path: str | None = None

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

    # ------------------------------------------------------------------ generation

    async def generate(
        self,
        input_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        return_logprob: bool = True,
        rid: str | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        """One completion of ``input_ids``; an abort is a result with the partial output."""
        if sampling.n not in (None, 1):
            raise ValueError("generate() takes n == 1; use generate_samples() for n > 1")
        (result,) = await self._generate(input_ids, sampling, 1, rid, return_logprob, timeout_s)
        if isinstance(result, InferenceError):
            raise result
        return result

    async def generate_samples(
        self,
        input_ids: Sequence[int],
        n: int,
        sampling: SamplingParams,
        *,
        return_logprob: bool = True,
        timeout_s: float | None = None,
    ) -> list[GenerateResult | InferenceError]:
        """``n`` samples of one prompt as one request with vLLM's ``n`` (one shared prefill)."""
        if sampling.n not in (None, 1):
            raise ValueError("generate_samples() sets n itself; leave sampling.n unset")
        group = msgspec.structs.replace(sampling, n=n) if n > 1 else sampling
        return await self._generate(input_ids, group, n, None, return_logprob, timeout_s)

    async def _generate(
        self,
        input_ids: Sequence[int],
        sampling: SamplingParams,
        n: int,
        rid: str | None,
        return_logprob: bool,
        timeout_s: float | None,
    ) -> list[GenerateResult | InferenceError]:
        body = {
            "token_ids": list(input_ids),
            "sampling_params": vllm_sampling(sampling, return_logprob=return_logprob),
        }
        base = rid or new_rid()
        current = [base]

        def body_for(attempt: int) -> dict[str, Any]:
            current[0] = attempt_rid(base, attempt)
            return {**body, "request_id": current[0]}

        response = await self._abort_on_exit(
            self._transport.request(
                "POST", GENERATE, body_for=body_for, timeout_s=timeout_s or self.request_timeout_s
            ),
            current,
        )
        answer = decode_generate(response.content)
        return choice_results(answer, n, return_logprob=return_logprob)

    async def _abort_on_exit(
        self, call: Awaitable[httpx.Response], rids: list[str]
    ) -> httpx.Response:
        """Await ``call``; if cancelled or timed out, abort ``rids`` on the server first."""
        try:
            return await call
        except anyio.get_cancelled_exc_class():
            await self._abort_quietly(rids)
            raise
        except EngineUnavailable as err:
            if isinstance(err.__cause__, TimeoutError):
                await self._abort_quietly(rids)
            raise

    async def _abort_quietly(self, rids: list[str]) -> None:
        """Best-effort abort, shielded, within ``abort_grace_s``; failures only logged."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.abort_grace_s):
            try:
                await self._abort(rids, self.abort_grace_s)
            except InferenceError as err:
                logger.debug("abort of {} on {} failed: {}", rids, self.base_url, err)

    # ------------------------------------------------------------------ control

    async def health(self, *, timeout_s: float | None = None) -> bool:
        """``GET /health`` answered 200 (False on errors and timeouts)."""
        try:
            response = await self._transport.request(
                "GET", "/health", timeout_s=timeout_s or self.control_timeout_s, retries=0
            )
        except InferenceError as err:
            logger.debug("{} /health: {}", self.base_url, err)
            return False
        return response.status_code == 200

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        """``GET /weight_info`` (the label), with the served folder from ``/v1/models``."""
        timeout = timeout_s or self.control_timeout_s
        if self._model_path is None:
            models = _decode(await self._get("/v1/models", timeout), _Models, "/v1/models")
            self._model_path = str(models.data[0].get("id", "")) if models.data else ""
        info = _decode(await self._get("/weight_info", timeout), _WeightInfo, "/weight_info")
        version = None if info.weight_version is None else str(info.weight_version)
        return ModelInfo(model_path=self._model_path, weight_version=version)

    async def pause_generation(
        self, mode: PauseMode = "abort", *, timeout_s: float | None = None
    ) -> None:
        """``POST /pause``: ``abort`` → ``mode=abort``, ``in_place`` → ``mode=keep``."""
        vllm_mode = _PAUSE_MODES.get(mode)
        if vllm_mode is None:
            raise ValueError(f"pause mode {mode!r}: vLLM pauses with abort, wait or keep only")
        await self._pause(vllm_mode, timeout_s)

    async def continue_generation(self, *, timeout_s: float | None = None) -> None:
        """``POST /resume``."""
        await self._post("/resume", None, timeout_s)
        self.paused = False

    async def abort_request(
        self, rid: str | None = None, *, abort_all: bool = False, timeout_s: float | None = None
    ) -> None:
        """``POST /abort_requests`` for our ``rid`` (its children too), or all requests."""
        if not rid and not abort_all:
            raise ValueError("abort_request needs a rid or abort_all=True")
        await self._abort([] if abort_all or not rid else [rid], timeout_s)

    async def flush_cache(self, *, timeout_s: float | None = None) -> str:
        """``POST /reset_prefix_cache``; ``success: false`` (requests hold blocks) raises."""
        response = await self._post("/reset_prefix_cache", None, timeout_s)
        _checked(response, "/reset_prefix_cache")
        return response.text

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str | int | None = None,
        flush_cache: bool = True,
        timeout_s: float | None = None,
    ) -> WeightUpdateResult:
        """``/collective_rpc reload_weights`` of ``model_path``, then the prefix cache reset and
        the label set, all while paused (``mode=wait`` here unless already paused)."""
        own_pause = not self.paused
        if own_pause:
            await self._pause("wait", timeout_s)
        try:
            rpc = {"method": "reload_weights", "kwargs": {"weights_path": model_path}}
            await self._post("/collective_rpc", rpc, timeout_s, retries=0)
            if flush_cache:
                await self.flush_cache(timeout_s=timeout_s)
            if weight_version is not None:
                await self.update_weight_version(weight_version, timeout_s=timeout_s)
        finally:
            if own_pause:
                await self._resume_quietly()
        return WeightUpdateResult(success=True, message=f"reloaded {model_path}")

    async def update_weight_version(
        self, new_version: str | int, *, timeout_s: float | None = None
    ) -> ControlResult:
        """``POST /update_weight_version``: relabel the current weights (aborts nothing)."""
        body = {"new_version": str(new_version)}
        response = await self._post("/update_weight_version", body, timeout_s, retries=0)
        return _checked(response, "/update_weight_version")

    # ------------------------------------------------------------------ plumbing

    async def _pause(self, vllm_mode: str, timeout_s: float | None) -> None:
        await self._post("/pause", None, timeout_s, params={"mode": vllm_mode})
        self.paused = True

    async def _resume_quietly(self) -> None:
        """Resume after a load that paused by itself: shielded, bounded, failures logged."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.control_timeout_s):
            try:
                await self.continue_generation(timeout_s=self.control_timeout_s)
            except InferenceError as err:
                logger.warning("resume of {} after a weight load failed: {}", self.base_url, err)

    async def _abort(self, rids: list[str], timeout_s: float | None) -> None:
        body = {"request_ids": [SERVER_RID_PREFIX + rid for rid in rids]} if rids else {}
        await self._post("/abort_requests", body, timeout_s, retries=0)

    async def _get(self, path: str, timeout_s: float) -> bytes:
        response = await self._transport.request("GET", path, timeout_s=timeout_s)
        return response.content

    async def _post(
        self,
        path: str,
        body: Any,
        timeout_s: float | None,
        *,
        retries: int | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self._transport.request(
            "POST",
            path,
            body=body,
            params=params,
            timeout_s=timeout_s or self.control_timeout_s,
            retries=retries,
        )


def _decode(body: bytes, type_: type[T], path: str) -> T:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.DecodeError as err:
        raise GenerationError(f"malformed {path} payload: {err}") from err


def _checked(response: httpx.Response, path: str) -> ControlResult:
    """A ``{"success": ...}`` answer; ``success: false`` raises :class:`RequestRejected`."""
    result = _decode(response.content, ControlResult, path)
    if not result.success:
        raise RequestRejected(response.status_code, result.message or f"{path}: success false")
    return result
