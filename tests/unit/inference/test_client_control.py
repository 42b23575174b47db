"""Control endpoints through the client against the simulated server."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import httpx
import pytest

from nexrl_async.config.inference import AttachInference
from nexrl_async.core.errors import RequestRejected
from nexrl_async.inference.client.sglang import GenerateResult, SamplingParams, SGLangClient
from nexrl_async.testing.simulated import SimulatedServer

Spawn = Callable[..., tuple[SimulatedServer, SGLangClient]]
PROMPT = [8, 9, 10]
LONG = SamplingParams(max_new_tokens=200, ignore_eos=True)


async def test_health_probes(sim: SimulatedServer, client: SGLangClient) -> None:
    assert await client.health()
    assert await client.health_generate()
    sim.engine.faults.unhealthy = True
    assert not await client.health()
    assert not await client.health_generate()


@pytest.mark.parametrize("legacy", [False, True])
async def test_model_and_server_info_with_and_without_the_new_routes(
    spawn: Spawn, legacy: bool
) -> None:
    _, client = spawn(legacy=legacy, model_path="/models/tiny", weight_version="4")
    info = await client.model_info()
    assert (info.model_path, info.weight_version, info.weight_version_int) == (
        "/models/tiny",
        "4",
        4,
    )
    server = await client.server_info()
    assert server.context_length == 8192
    assert server.max_req_input_len == 8191
    assert (server.tp_size, server.dp_size) == (1, 1)
    assert server.raw["launch_command"].startswith("python -m")


async def test_flush_cache_when_idle_and_when_busy(spawn: Spawn) -> None:
    sim, client = spawn(token_latency_s=0.01)
    assert (await client.flush_cache()).startswith("Cache flushed.")
    async with anyio.create_task_group() as group:
        group.start_soon(client.generate, PROMPT, LONG)
        await anyio.sleep(0.03)
        with pytest.raises(RequestRejected, match="Cache not flushed") as info:
            await client.flush_cache()
        assert info.value.status_code == 400
        with pytest.raises(RequestRejected, match="Timed out waiting for idle state"):
            await client.flush_cache(server_wait_s=0.02)
        group.cancel_scope.cancel()
    assert sim.engine.stats.flushes == 1


async def _generate_into(
    client: SGLangClient, out: list[GenerateResult], rid: str | None = None
) -> None:
    out.append(await client.generate(PROMPT, LONG, rid=rid))


async def test_pause_abort_returns_partial_outputs_and_blocks_new_requests(spawn: Spawn) -> None:
    sim, client = spawn(token_latency_s=0.002)
    results: list[GenerateResult] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_generate_into, client, results)
        await anyio.sleep(0.03)
        await client.pause_generation("abort")
        assert results[0].aborted
        assert results[0].finish_reason.message == "Aborted"
        partial = results[0].output_ids
        assert 0 < len(partial) < 200
        assert results[0].output_logprobs is not None
        assert len(results[0].output_logprobs) == len(partial)
        group.start_soon(_generate_into, client, results)
        await anyio.sleep(0.03)
        assert len(results) == 1
        await client.continue_generation()
    assert results[1].finish_reason.type == "length"
    assert list(sim.engine.stats.pauses) == ["abort"]
    assert sim.engine.stats.continues == 1


async def test_in_place_pause_and_update_record_both_versions(spawn: Spawn) -> None:
    _sim, client = spawn(token_latency_s=0.002, weight_version="1")
    results: list[GenerateResult] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_generate_into, client, results)
        await anyio.sleep(0.03)
        await client.pause_generation("in_place")
        await client.update_weights_from_disk("/w/2", weight_version=2, flush_cache=False)
        await client.continue_generation(torch_empty_cache=False)
    (result,) = results
    assert [s.version for s in result.weight_versions] == ["1", "2"]
    spans = result.version_spans(fallback=0)
    assert [s.version for s in spans] == [1, 2]
    assert spans[-1].end == 200
    assert result.weight_version == "2"


async def test_update_flushing_under_an_in_place_pause_fails_but_swaps(spawn: Spawn) -> None:
    sim, client = spawn(token_latency_s=0.002)
    async with anyio.create_task_group() as group:
        group.start_soon(client.generate, PROMPT, LONG)
        await anyio.sleep(0.03)
        await client.pause_generation("in_place")
        with pytest.raises(RequestRejected, match="cache was not flushed"):
            await client.update_weights_from_disk("/w/9", weight_version=9)
        assert sim.engine.weight_version == "9"
        await client.continue_generation()


async def test_abort_request_by_rid_and_all(spawn: Spawn) -> None:
    sim, client = spawn(token_latency_s=0.002)
    results: list[GenerateResult] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_generate_into, client, results, "a")
        group.start_soon(_generate_into, client, results, "b")
        await anyio.sleep(0.03)
        await client.abort_request("a")
        await anyio.sleep(0.01)
        assert [r.rid for r in results] == ["a"]
        await client.abort_request(abort_all=True)
    assert all(r.aborted for r in results)
    assert list(sim.engine.stats.abort_calls) == [
        {"rid": "a", "abort_all": False},
        {"rid": "", "abort_all": True},
    ]
    await client.abort_request("unknown")
    with pytest.raises(ValueError, match="rid or abort_all"):
        await client.abort_request()


async def test_update_from_disk_changes_version_and_model(
    sim: SimulatedServer, client: SGLangClient
) -> None:
    result = await client.update_weights_from_disk("/ckpt/v1", weight_version=1)
    assert (result.success, result.num_paused_requests) == (True, 0)
    info = await client.model_info()
    assert (info.model_path, info.weight_version_int) == ("/ckpt/v1", 1)
    body = sim.engine.stats.weight_updates[-1]
    assert body == {"kind": "disk", "model_path": "/ckpt/v1", "version": "1"}


async def test_failed_update_raises_with_the_server_message(
    sim: SimulatedServer, client: SGLangClient
) -> None:
    sim.engine.faults.weight_update_failures = 1
    with pytest.raises(RequestRejected, match="Failed to update weights") as info:
        await client.update_weights_from_disk("/ckpt/v2", weight_version=2)
    assert info.value.status_code == 400
    assert sim.engine.weight_version == "default"


async def test_update_waits_for_running_requests_unless_it_aborts_them(spawn: Spawn) -> None:
    _sim, client = spawn(token_latency_s=0.002)
    results: list[GenerateResult] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_generate_into, client, results)
        await anyio.sleep(0.02)
        await client.update_weights_from_disk("/w/1", weight_version=1)
        assert results[0].finish_reason.type == "length"
        group.start_soon(_generate_into, client, results)
        await anyio.sleep(0.02)
        await client.update_weights_from_disk("/w/2", weight_version=2, abort_all_requests=True)
    assert results[1].aborted
    assert results[1].weight_version == "1"


async def test_update_weight_version(sim: SimulatedServer, client: SGLangClient) -> None:
    result = await client.update_weight_version(12)
    assert result.success
    assert (await client.model_info()).weight_version_int == 12


async def test_distributed_flow_with_a_session(sim: SimulatedServer, client: SGLangClient) -> None:
    group = await client.init_weights_update_group("10.0.0.1", 29500, 1, 2, backend="gloo")
    assert group.success
    with pytest.raises(RequestRejected, match="between begin_weight_update"):
        await client.update_weights_from_distributed(["w"], ["bfloat16"], [[2, 2]])
    async with client.weight_update_session() as opened:
        assert opened
        assert sim.engine.session_open
        await client.update_weights_from_distributed(
            ["w", "b"], ["bfloat16", "float32"], [[2, 2], [2]], weight_version=3
        )
    assert not sim.engine.session_open
    assert client.has_weight_update_session
    assert sim.engine.weight_version == "3"
    assert (await client.destroy_weights_update_group()).success
    with pytest.raises(RequestRejected, match="does not exist"):
        await client.destroy_weights_update_group()


async def test_session_is_closed_when_the_body_fails(
    sim: SimulatedServer, client: SGLangClient
) -> None:
    with pytest.raises(RequestRejected, match="not initialized"):
        async with client.weight_update_session():
            await client.update_weights_from_distributed(["w"], ["float32"], [[1]])
    assert not sim.engine.session_open
    await client.begin_weight_update()
    with pytest.raises(RequestRejected, match="already open"):
        await client.begin_weight_update()


async def test_legacy_server_needs_no_session(spawn: Spawn) -> None:
    sim, client = spawn(legacy=True)
    await client.init_weights_update_group("127.0.0.1", 29500, 1, 2)
    async with client.weight_update_session() as opened:
        assert not opened
        await client.update_weights_from_distributed(["w"], ["float32"], [[1]], weight_version=1)
    assert client.has_weight_update_session is False
    assert not await client.end_weight_update()
    assert sim.engine.weight_version == "1"


async def test_memory_release_and_resume(spawn: Spawn) -> None:
    sim, client = spawn(token_latency_s=0.005)
    await client.release_memory_occupation(["kv_cache"])
    assert sim.engine.released_tags == {"kv_cache"}
    await client.resume_memory_occupation()
    assert sim.engine.released_tags == set()
    async with anyio.create_task_group() as group:
        group.start_soon(client.generate, PROMPT, LONG)
        await anyio.sleep(0.02)
        with pytest.raises(RequestRejected, match="requires an idle server"):
            await client.release_memory_occupation()
        group.cancel_scope.cancel()


async def test_success_false_with_200_is_an_error() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"success": False, "message": "flush refused"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        client = SGLangClient("http://mock", http=http)
        with pytest.raises(RequestRejected, match="flush refused") as info:
            await client.update_weights_from_disk("/w")
        assert info.value.status_code == 200


async def test_from_config_takes_the_inference_section(http: httpx.AsyncClient) -> None:
    config = AttachInference(urls=["http://h:1/"], api_key="k", request_timeout_s=9.0, retries=1)
    client = SGLangClient.from_config("http://h:1/", config, http=http)
    assert client.base_url == "http://h:1"
    assert client.request_timeout_s == 9.0
