"""Every documented error case maps to the right error, with the server's message."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import httpx
import pytest

from nexrl_async.core.errors import (
    EngineUnavailable,
    GenerationError,
    InferenceError,
    RequestRejected,
)
from nexrl_async.inference.client.sglang import RetryPolicy, SamplingParams, SGLangClient
from nexrl_async.testing.simulated import SimulatedServer

Spawn = Callable[..., tuple[SimulatedServer, SGLangClient]]
PROMPT = [3, 4, 5]
FAST = RetryPolicy(base_delay_s=0.001, max_delay_s=0.002)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (SamplingParams(top_p=0.0), "top_p must be in (0, 1], got 0.0."),
        (SamplingParams(top_k=0), "top_k must be -1 (disable) or at least 1, got 0."),
        (SamplingParams(temperature=-1.0), "temperature must be non-negative, got -1.0."),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty must be in (0, 2]"),
        (SamplingParams(max_new_tokens=-1), "max_new_tokens must be at least 0, got -1."),
    ],
)
async def test_bad_sampling_values_are_rejected_with_the_server_message(
    client: SGLangClient, sim: SimulatedServer, sampling: SamplingParams, message: str, stream: bool
) -> None:
    with pytest.raises(RequestRejected) as info:
        await client.generate(PROMPT, sampling, stream=stream)
    assert info.value.status_code == 400
    assert info.value.message.startswith(message)
    assert sim.engine.stats.generate_requests == 0


async def test_schema_violations_are_rejected(client: SGLangClient) -> None:
    wrong_type = SamplingParams(top_k="many")  # type: ignore[arg-type]
    with pytest.raises(RequestRejected, match="Invalid request") as info:
        await client.generate(PROMPT, wrong_type, stream=True)
    assert info.value.status_code == 400


@pytest.mark.parametrize("stream", [False, True])
async def test_prompts_beyond_the_context_are_rejected(spawn: Spawn, stream: bool) -> None:
    _, client = spawn(context_length=16)
    with pytest.raises(RequestRejected, match=r"The input \(20 tokens\) is longer than the model"):
        await client.generate(list(range(20)), SamplingParams(max_new_tokens=1), stream=stream)
    with pytest.raises(RequestRejected, match=r"Requested token count exceeds .* of 16 tokens"):
        await client.generate(list(range(10)), SamplingParams(max_new_tokens=7), stream=stream)


@pytest.mark.parametrize("stream", [False, True])
async def test_duplicate_rid_is_rejected_and_the_original_runs_on(
    spawn: Spawn, stream: bool
) -> None:
    sim, client = spawn(token_latency_s=0.005)
    sampling = SamplingParams(max_new_tokens=20, ignore_eos=True)
    results = []

    async def original() -> None:
        results.append(await client.generate(PROMPT, sampling, rid="dup"))

    async with anyio.create_task_group() as group:
        group.start_soon(original)
        await anyio.sleep(0.02)
        with pytest.raises(RequestRejected, match="Duplicate request ID detected: dup"):
            await client.generate(PROMPT, sampling, rid="dup", stream=stream)
    assert results[0].finish_reason.type == "length"
    assert list(sim.engine.stats.abort_calls) == []


async def test_missing_or_wrong_api_key_is_401(spawn: Spawn) -> None:
    for key in (None, "wrong"):
        _, client = spawn(api_key="right", client={"api_key": key})
        with pytest.raises(RequestRejected, match="Unauthorized") as info:
            await client.generate(PROMPT, SamplingParams())
        assert info.value.status_code == 401
        assert await client.health()


async def test_unknown_route_is_404(client: SGLangClient) -> None:
    with pytest.raises(RequestRejected, match="Not Found") as info:
        await client._transport.request("GET", "/no_such_route", timeout_s=1)
    assert info.value.status_code == 404


async def test_503_is_retried_with_fresh_rids_then_succeeds(
    sim: SimulatedServer, client: SGLangClient
) -> None:
    sim.engine.faults.fail_generate = 2
    result = await client.generate(PROMPT, SamplingParams(max_new_tokens=4), rid="x")
    assert result.rid == "x-retry2"
    assert [b["rid"] for b in sim.engine.stats.bodies] == ["x", "x-retry1", "x-retry2"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [502, 503, 504])
async def test_exhausted_retries_raise_engine_unavailable(
    spawn: Spawn, status: int, stream: bool
) -> None:
    sim, client = spawn(client={"retries": 2})
    sim.engine.faults.fail_generate, sim.engine.faults.fail_status = 10, status
    with pytest.raises(EngineUnavailable, match=f"HTTP {status}") as info:
        await client.generate(PROMPT, SamplingParams(), stream=stream)
    assert info.value.retryable
    assert len(sim.engine.stats.bodies) == 3


async def test_503_message_is_the_servers(sim: SimulatedServer, client: SGLangClient) -> None:
    sim.engine.faults.fail_generate = 10
    with pytest.raises(EngineUnavailable, match="waited too long and was aborted"):
        await client.generate(PROMPT, SamplingParams())


async def test_rejections_and_500s_are_never_retried(spawn: Spawn) -> None:
    sim, client = spawn(client={"retries": 5})
    with pytest.raises(RequestRejected):
        await client.generate(PROMPT, SamplingParams(top_p=0.0))
    assert len(sim.engine.stats.bodies) == 1
    sim.engine.faults.fail_generate, sim.engine.faults.fail_status = 3, 500
    with pytest.raises(EngineUnavailable, match="HTTP 500") as info:
        await client.generate(PROMPT, SamplingParams())
    assert not info.value.retryable
    assert len(sim.engine.stats.bodies) == 2


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        ("stream_errors", "error event .*Simulated failure mid-stream"),
        ("truncations", "ended before the request finished"),
        ("garbles", "malformed"),
    ],
)
async def test_broken_streams_raise_generation_error(
    sim: SimulatedServer, client: SGLangClient, fault: str, match: str
) -> None:
    setattr(sim.engine.faults, fault, 1)
    sampling = SamplingParams(max_new_tokens=10, ignore_eos=True)
    with pytest.raises(GenerationError, match=match):
        await client.generate(PROMPT, sampling, stream=True)
    assert len((await client.generate(PROMPT, sampling, stream=True)).output_ids) == 10


def _mock_client(handler: Callable[[httpx.Request], object], **kwargs: object) -> SGLangClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    return SGLangClient("http://mock", http=http, backoff=FAST, seed=0, **kwargs)  # type: ignore[arg-type]


async def test_transport_errors_are_retried_then_unavailable() -> None:
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("connection refused", request=request)

    client = _mock_client(refuse, retries=3)
    with pytest.raises(EngineUnavailable, match="ConnectError: connection refused"):
        await client.generate(PROMPT, SamplingParams())
    assert calls == ["/generate"] * 4
    assert not await client.health()


async def test_a_transport_error_then_success() -> None:
    calls: list[int] = []
    body = {
        "output_ids": [7],
        "meta_info": {"id": "r", "finish_reason": {"type": "length", "length": 1},
                      "completion_tokens": 1, "output_token_logprobs": [[-0.5, 7, None]]},
    }  # fmt: skip

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ReadError("reset by peer", request=request)
        return httpx.Response(200, json=body)

    result = await _mock_client(flaky).generate(PROMPT, SamplingParams(max_new_tokens=1))
    assert (result.output_ids, result.output_logprobs, len(calls)) == ([7], [-0.5], 2)


async def test_garbled_non_stream_body_is_a_generation_error() -> None:
    client = _mock_client(lambda request: httpx.Response(200, content=b"<html>oops"))
    with pytest.raises(GenerationError, match="malformed"):
        await client.generate(PROMPT, SamplingParams())


async def test_a_deadline_raises_unavailable_and_aborts_on_the_server() -> None:
    seen: list[tuple[str, bytes]] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.content))
        if request.url.path == "/generate":
            await anyio.sleep(5)
        return httpx.Response(200)

    client = _mock_client(slow, request_timeout_s=0.05)
    with anyio.fail_after(2):
        with pytest.raises(EngineUnavailable, match=r"no answer within 0\.05 s"):
            await client.generate(PROMPT, SamplingParams(), rid="late")
    assert seen[-1] == ("/abort_request", b'{"rid":"late","abort_all":false}')


async def test_errors_share_the_inference_base(client: SGLangClient) -> None:
    with pytest.raises(InferenceError):
        await client.generate(PROMPT, SamplingParams(top_k=0))
