"""Async client for one SGLang server's native HTTP API (docs/sglang_api.md is the contract).

The run owns one HTTP pool (``inference.http``) and hands it to every :class:`SGLangClient`
(one per server URL); the client never creates its own. Every call runs under a deadline; transport
errors and 502/503/504 are retried (bounded, jittered); 4xx raise :class:`RequestRejected` with
the server's message; broken streams raise :class:`GenerationError` (see ``transport``).

Generation: :meth:`SGLangClient.generate` returns a :class:`GenerateResult` (aborts are results
with ``finish_reason.type == "abort"`` and valid partial output, not errors);
:meth:`SGLangClient.generate_samples` returns ``n`` samples of one prompt from one request;
:meth:`SGLangClient.stream_generate` yields delta :class:`StreamChunk` s from SGLang's
cumulative or incremental streams. Cancelling a generation, or its deadline passing, aborts it
on the server (``/abort_request`` with the rid, shielded, within ``abort_grace_s``).

Control endpoints (health, info, flush, pause/continue, abort, weight updates, memory) come from
:class:`nexrl_async.inference.client.control.ServerControl`.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import anyio
import httpx

from nexrl_async.core.errors import EngineUnavailable, GenerationError, InferenceError
from nexrl_async.inference.client.control import ServerControl
from nexrl_async.inference.client.retry import RetryPolicy
from nexrl_async.inference.client.stream import GenerationStream, attempt_rid
from nexrl_async.inference.client.structs import (
    ControlResult,
    FinishReason,
    GenerateResult,
    ModelInfo,
    SamplingParams,
    ServerInfo,
    StreamChunk,
    WeightUpdateResult,
    WeightVersionSpan,
    parse_version,
)
from nexrl_async.inference.client.wire import WireGenerate, decode_batch, decode_event, to_result

__all__ = [
    "ControlResult",
    "FinishReason",
    "GenerateResult",
    "GenerationStream",
    "ModelInfo",
    "RetryPolicy",
    "SGLangClient",
    "SamplingParams",
    "ServerControl",
    "ServerInfo",
    "StreamChunk",
    "WeightUpdateResult",
    "WeightVersionSpan",
    "new_rid",
    "parse_version",
]


_RID_PREFIX = uuid.uuid4().hex[:16]
_rid_counter = itertools.count()


def new_rid() -> str:
    """A fresh request id: 32 hex digits like SGLang's uuid4 rids, a random per-process prefix
    and a counter. Unique without a ``urandom`` call per request (a syscall, so a GIL hand-off
    while a train step runs in a worker thread)."""
    return f"{_RID_PREFIX}{next(_rid_counter):016x}"


class SGLangClient(ServerControl):
    """Client of one SGLang (or SGLang-compatible) server at ``base_url``."""

    async def generate(
        self,
        input_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        return_logprob: bool = True,
        rid: str | None = None,
        stream: bool = False,
        timeout_s: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> GenerateResult:
        """Generate one completion of ``input_ids`` (``sampling.n`` must be 1).

        ``stream=True`` uses SSE under the hood and returns the same result. ``extra`` adds
        top-level ``/generate`` fields (``lora_path``, ``return_routed_experts``, ...).
        Cancelling the caller or reaching ``timeout_s`` aborts the request on the server.
        """
        if stream:
            generation = self.stream_generate(
                input_ids, sampling, return_logprob=return_logprob, rid=rid,
                timeout_s=timeout_s, extra=extra,
            )  # fmt: skip
            async with generation:
                async for _ in generation:
                    pass
            return generation.result
        body = self._generate_body(input_ids, sampling, rid, return_logprob, False, extra)
        current = [str(body["rid"])]

        def body_for(attempt: int) -> dict[str, Any]:
            current[0] = attempt_rid(str(body["rid"]), attempt)
            return {**body, "rid": current[0]}

        response = await self._abort_on_exit(
            self._transport.request(
                "POST",
                "/generate",
                body_for=body_for,
                timeout_s=timeout_s or self.request_timeout_s,
            ),
            current,
        )
        return to_result(decode_event(response.content), return_logprob=return_logprob)

    def stream_generate(
        self,
        input_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        return_logprob: bool = True,
        rid: str | None = None,
        timeout_s: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> GenerationStream:
        """A streamed generation; use as ``async with ... as s: async for chunk in s``."""
        return GenerationStream(
            self._transport,
            body=self._generate_body(input_ids, sampling, rid, return_logprob, True, extra),
            return_logprob=return_logprob,
            mode=self.stream_mode,
            timeout_s=timeout_s or self.request_timeout_s,
            abort=self._abort_quietly,
            close_grace_s=self.abort_grace_s,
        )

    async def generate_samples(
        self,
        input_ids: Sequence[int],
        n: int,
        sampling: SamplingParams,
        *,
        return_logprob: bool = True,
        timeout_s: float | None = None,
    ) -> list[GenerateResult | InferenceError]:
        """``n`` independent samples of one prompt in one request (a group's first turn).

        Sent as SGLang's batch form, the prompt ``n`` times with one rid per sample, rather than
        ``sampling_params.n``: with ``n`` SGLang replaces the rids, so a cancelled request could
        not be aborted by rid (docs/sglang_api.md §2.3). The answer is a list in sample order.
        Item ``i`` is sample ``i``'s result (an abort is a result with its partial output), or
        the error decoding it met (mismatched logprobs, an abort carrying an HTTP status);
        errors of the request itself are raised as :meth:`generate` raises them.
        """
        return await self.generate_prompts(
            [input_ids] * n, sampling, return_logprob=return_logprob, timeout_s=timeout_s
        )

    async def generate_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        rids: list[str] | None = None,
        return_logprob: bool = True,
        timeout_s: float | None = None,
    ) -> list[GenerateResult | InferenceError]:
        """One sample of each prompt, all in one request (SGLang's batch form, one rid each).

        ``rids`` (one per prompt; fresh ones when ``None``) is updated in place to the ids on
        the wire (a transport retry suffixes them), so a caller can abort one prompt's sample
        while the request runs. Answer ``i`` belongs to ``prompts[i]``, as in
        :meth:`generate_samples`.
        """
        if sampling.n not in (None, 1):
            raise ValueError("generate_prompts() samples each prompt once; leave sampling.n unset")
        base = list(rids) if rids is not None else [new_rid() for _ in prompts]
        if len(base) != len(prompts):
            raise ValueError(f"{len(base)} rids for {len(prompts)} prompts")
        current = rids if rids is not None else list(base)
        body: dict[str, Any] = {
            "input_ids": [list(p) for p in prompts],
            "sampling_params": sampling,
            "return_logprob": return_logprob,
            "stream": False,
        }

        def body_for(attempt: int) -> dict[str, Any]:
            current[:] = [attempt_rid(rid, attempt) for rid in base]
            return {**body, "rid": list(current)}

        response = await self._abort_on_exit(
            self._transport.request(
                "POST",
                "/generate",
                body_for=body_for,
                timeout_s=timeout_s or self.request_timeout_s,
            ),
            current,
        )
        wires = decode_batch(response.content)
        if len(wires) != len(prompts):
            raise GenerationError(f"expected {len(prompts)} results, got {len(wires)}")
        return [_result_or_error(wire, return_logprob) for wire in wires]

    async def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        return_logprob: bool = True,
        timeout_s: float | None = None,
    ) -> list[list[GenerateResult]]:
        """One request for several prompts, ``sampling.n`` samples each → results per prompt.

        With ``n > 1`` SGLang replaces the rids, so such a request cannot be aborted by rid;
        RL workers use :meth:`generate_samples` for a group's samples.
        """
        n = sampling.n or 1
        rids = [new_rid() for _ in prompts]
        body: dict[str, Any] = {
            "input_ids": [list(p) for p in prompts],
            "sampling_params": sampling,
            "return_logprob": return_logprob,
        }
        if n == 1:
            body["rid"] = rids
        response = await self._abort_on_exit(
            self._transport.request(
                "POST", "/generate", body=body, timeout_s=timeout_s or self.request_timeout_s
            ),
            rids if n == 1 else [],
        )
        results = [
            to_result(w, return_logprob=return_logprob) for w in decode_batch(response.content)
        ]
        if len(results) != n * len(prompts):
            raise GenerationError(f"expected {n * len(prompts)} results, got {len(results)}")
        return [results[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_body(
        self,
        input_ids: Sequence[int],
        sampling: SamplingParams,
        rid: str | None,
        return_logprob: bool,
        stream: bool,
        extra: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        if sampling.n not in (None, 1):
            raise ValueError("generate() takes n == 1; use generate_batch() for n > 1")
        return {
            **(extra or {}),
            "input_ids": list(input_ids),
            "sampling_params": sampling,
            "rid": rid or new_rid(),
            "return_logprob": return_logprob,
            "stream": stream,
        }

    async def _abort_on_exit(
        self, call: Awaitable[httpx.Response], rids: list[str]
    ) -> httpx.Response:
        """Await ``call``; if cancelled or timed out, abort ``rids`` on the server first."""
        try:
            return await call
        except anyio.get_cancelled_exc_class():
            await self._abort_quietly(*rids)
            raise
        except EngineUnavailable as err:
            if isinstance(err.__cause__, TimeoutError):
                await self._abort_quietly(*rids)
            raise


def _result_or_error(wire: WireGenerate, return_logprob: bool) -> GenerateResult | InferenceError:
    try:
        return to_result(wire, return_logprob=return_logprob)
    except InferenceError as err:
        return err
