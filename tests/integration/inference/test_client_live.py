"""The client against the simulated server over real sockets (uvicorn in this event loop):
streaming in time, cancellation and deadlines abort on the server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from nexrl_async.core.errors import EngineUnavailable
from nexrl_async.inference.client.sglang import SamplingParams, SGLangClient, StreamChunk
from nexrl_async.testing.simulated import SimulatedConfig, SimulatedServer

PROMPT = [11, 12, 13]
LONG = SamplingParams(max_new_tokens=400, ignore_eos=True)
LATENCY_S = 0.01


@pytest.fixture
def sim() -> SimulatedServer:
    return SimulatedServer(SimulatedConfig(token_latency_s=LATENCY_S))


@asynccontextmanager
async def live(sim: SimulatedServer) -> AsyncIterator[SGLangClient]:
    """The server runs in a task group, so it is entered in the test's own task (a
    pytest-asyncio yield fixture would exit it from another task)."""
    async with sim.serve() as url, httpx.AsyncClient() as http:
        yield SGLangClient(url, http=http, request_timeout_s=10.0, abort_grace_s=1.0)


async def _wait_for_abort(sim: SimulatedServer, rid: str) -> None:
    """Until the server saw ``/abort_request`` for ``rid`` and holds no request."""
    with anyio.fail_after(2):
        # polling server-side state from a test: there is no event to wait on
        while not any(c["rid"] == rid for c in sim.engine.stats.abort_calls):  # noqa: ASYNC110
            await anyio.sleep(0.005)
        while sim.engine.requests:  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def test_stream_chunks_arrive_while_the_server_generates(sim: SimulatedServer) -> None:
    sampling = SamplingParams(max_new_tokens=30, ignore_eos=True)
    arrivals: list[tuple[float, StreamChunk]] = []
    async with live(sim) as client:
        start = anyio.current_time()
        async with client.stream_generate(PROMPT, sampling) as stream:
            async for chunk in stream:
                arrivals.append((anyio.current_time() - start, chunk))
        plain = await client.generate(PROMPT, sampling)
    first, last = arrivals[0][0], arrivals[-1][0]
    assert len(arrivals) == 30
    assert first < 0.5 * last
    assert last >= 30 * LATENCY_S * 0.9
    assert stream.result.output_ids == [t for _, c in arrivals for t in c.token_ids]
    assert plain.output_ids == stream.result.output_ids


async def test_cancelling_a_generate_aborts_it_on_the_server(sim: SimulatedServer) -> None:
    async with live(sim) as client:
        with anyio.move_on_after(0.1):
            await client.generate(PROMPT, LONG, rid="cancel-me")
        await _wait_for_abort(sim, "cancel-me")
    assert sim.engine.stats.aborted == 1


async def test_cancelling_a_stream_aborts_it_on_the_server(sim: SimulatedServer) -> None:
    received = 0
    async with live(sim) as client:
        with anyio.move_on_after(0.1):
            async with client.stream_generate(PROMPT, LONG, rid="stream-cancel") as stream:
                async for chunk in stream:
                    received += len(chunk.token_ids)
        await _wait_for_abort(sim, "stream-cancel")
    assert 0 < received < 400


async def test_leaving_a_stream_early_aborts_it(sim: SimulatedServer) -> None:
    async with live(sim) as client:
        async with client.stream_generate(PROMPT, LONG, rid="early") as stream:
            async for _ in stream:
                break
        await _wait_for_abort(sim, "early")


async def test_a_finished_stream_sends_no_abort(sim: SimulatedServer) -> None:
    sampling = SamplingParams(max_new_tokens=5, ignore_eos=True)
    async with live(sim) as client, client.stream_generate(PROMPT, sampling, rid="done") as stream:
        async for chunk in stream:
            if chunk.final is not None:
                break
    assert stream.result.finish_reason.type == "length"
    assert list(sim.engine.stats.abort_calls) == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_deadline_aborts_and_raises_unavailable(sim: SimulatedServer, stream: bool) -> None:
    async with live(sim) as client:
        with pytest.raises(EngineUnavailable, match=r"0\.1 s"):
            await client.generate(PROMPT, LONG, rid="slow", stream=stream, timeout_s=0.1)
        await _wait_for_abort(sim, "slow")


async def test_pause_abort_ends_a_live_stream_with_partial_output(sim: SimulatedServer) -> None:
    results = []
    async with live(sim) as client:

        async def run() -> None:
            results.append(await client.generate(PROMPT, LONG, stream=True))

        async with anyio.create_task_group() as group:
            group.start_soon(run)
            await anyio.sleep(0.1)
            await client.pause_generation("abort")
            await client.continue_generation()
    (result,) = results
    assert result.aborted
    assert 0 < len(result.output_ids) < 400
