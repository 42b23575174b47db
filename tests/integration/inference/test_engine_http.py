"""The engine's HTTP pool (httpx on aiohttp, requests sent to the transport directly) against
the simulated server over real sockets: results, group requests, streams in time, errors,
cancellation and deadlines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import pytest

from nexrl_async.core.errors import EngineUnavailable, RequestRejected
from nexrl_async.inference.client.aiohttp_transport import AiohttpTransport
from nexrl_async.inference.client.http import HttpPool, open_http_pool
from nexrl_async.inference.client.sglang import (
    GenerateResult,
    RetryPolicy,
    SamplingParams,
    SGLangClient,
)
from nexrl_async.testing.simulated import SimulatedConfig, SimulatedServer

PROMPT = [11, 12, 13]
LONG = SamplingParams(max_new_tokens=400, ignore_eos=True)
FAST = RetryPolicy(base_delay_s=0.001, max_delay_s=0.005)


@asynccontextmanager
async def live(sim: SimulatedServer, **kw: float) -> AsyncIterator[SGLangClient]:
    async with sim.serve() as url, open_http_pool() as pool:
        yield SGLangClient(url, http=pool, abort_grace_s=1.0, **kw)


async def test_generate_and_group_requests() -> None:
    sim = SimulatedServer(SimulatedConfig(mean_output_tokens=6))
    async with live(sim) as client:
        one = await client.generate(PROMPT, SamplingParams(max_new_tokens=5, ignore_eos=True))
        group = await client.generate_samples(PROMPT, 3, SamplingParams(max_new_tokens=5))
        info = await client.model_info()
    assert len(one.output_ids) == 5
    assert one.output_logprobs is not None
    assert all(isinstance(r, GenerateResult) for r in group)
    assert info.model_path == "simulated-model"


async def test_stream_chunks_arrive_while_the_server_generates() -> None:
    sim = SimulatedServer(SimulatedConfig(token_latency_s=0.01))
    sampling = SamplingParams(max_new_tokens=20, ignore_eos=True)
    async with live(sim) as client, client.stream_generate(PROMPT, sampling) as stream:
        first = anyio.current_time()
        arrivals = [anyio.current_time() - first async for _ in stream]
        result = stream.result
    assert len(result.output_ids) == 20
    assert arrivals[-1] > 0.1, "chunks arrive as tokens are generated, not all at the end"


async def test_cancelling_a_request_aborts_it_on_the_server() -> None:
    sim = SimulatedServer(SimulatedConfig(token_latency_s=0.01))
    async with live(sim) as client:
        with anyio.move_on_after(0.1):
            await client.generate(PROMPT, LONG, rid="gone")
        with anyio.fail_after(2):
            while sim.engine.requests:  # noqa: ASYNC110 - polling the server's state
                await anyio.sleep(0.005)
    assert [c["rid"] for c in sim.engine.stats.abort_calls] == ["gone"]
    assert sim.engine.stats.aborted == 1


async def test_a_deadline_aborts_and_raises_unavailable() -> None:
    sim = SimulatedServer(SimulatedConfig(token_latency_s=0.01))
    async with live(sim, request_timeout_s=0.1) as client:
        with pytest.raises(EngineUnavailable, match="no answer within"):
            await client.generate(PROMPT, LONG, rid="late")
    assert [c["rid"] for c in sim.engine.stats.abort_calls] == ["late"]


async def test_rejections_carry_the_server_message() -> None:
    sim = SimulatedServer()
    async with live(sim) as client:
        with pytest.raises(RequestRejected, match="top_k"):
            await client.generate(PROMPT, SamplingParams(max_new_tokens=2, top_k=0))


async def test_no_server_is_a_retried_connect_error() -> None:
    async with open_http_pool() as pool:
        client = SGLangClient("http://127.0.0.1:9", http=pool, retries=1, backoff=FAST)
        with pytest.raises(EngineUnavailable, match="ConnectError"):
            await client.generate(PROMPT, LONG)


async def test_an_unknown_scheme_is_unsupported() -> None:
    transport = AiohttpTransport()
    async with httpx.AsyncClient(transport=transport) as http:
        pool = HttpPool([http], transports=[transport])
        with pytest.raises(httpx.UnsupportedProtocol):
            await pool.send(httpx.Request("GET", "ftp://127.0.0.1/x"))


async def test_a_body_cut_by_the_server_is_a_protocol_error() -> None:
    async def handler(stream: anyio.abc.SocketStream) -> None:
        await stream.receive()
        await stream.send(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"partial')
        await stream.aclose()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        transport = AiohttpTransport()
        async with httpx.AsyncClient(transport=transport) as http:
            pool = HttpPool([http], transports=[transport])
            with pytest.raises(httpx.TransportError):
                await pool.send(httpx.Request("GET", f"http://127.0.0.1:{port}/"))
        tg.cancel_scope.cancel()
