"""The simulated SGLang server itself: raw shapes, length distribution, time, CLI flags."""

from __future__ import annotations

import statistics
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from nexrl_async.testing.simulated import SimulatedConfig, SimulatedServer, parse_args
from nexrl_async.testing.simulated_engine import SamplingSpec, SimRequest

URL = SimulatedServer.ASGI_URL


@pytest.fixture
async def raw(sim: SimulatedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=sim.transport(), base_url=URL) as http:
        yield http


def _lengths(config: SimulatedConfig, prompts: int = 300) -> list[int]:
    spec = SamplingSpec(max_new_tokens=10**6)
    return [
        SimRequest(config, rid="r", prompt=[i], sampling=spec).natural_length
        for i in range(prompts)
    ]


def test_output_lengths_are_seeded_and_long_tailed() -> None:
    tailed = _lengths(SimulatedConfig(mean_output_tokens=50, output_tokens_sigma=1.0))
    assert tailed == _lengths(SimulatedConfig(mean_output_tokens=50, output_tokens_sigma=1.0))
    assert tailed != _lengths(SimulatedConfig(mean_output_tokens=50, seed=1))
    median = statistics.median(tailed)
    assert 35 <= median <= 70
    assert max(tailed) > 5 * median
    assert set(_lengths(SimulatedConfig(mean_output_tokens=50, output_tokens_sigma=0.0))) == {50}


async def test_schema_and_parse_errors_have_sglangs_bodies(raw: httpx.AsyncClient) -> None:
    unknown = await raw.post("/generate", json={"input_ids": [1], "sampling_params": {"topp": 1}})
    assert unknown.status_code == 400
    assert isinstance(unknown.json()["error"], str)
    assert "topp" in unknown.json()["error"]
    garbage = await raw.post("/generate", content=b"{not json")
    assert garbage.status_code == 400
    body = garbage.json()
    assert (body["object"], body["type"], body["code"], body["param"]) == (
        "error", "Bad Request", 400, None
    )  # fmt: skip
    empty = await raw.post("/generate", json={"sampling_params": {}})
    assert empty.json() == {
        "error": {"message": "Either text, input_ids or input_embeds should be provided."}
    }
    missing = await raw.get("/nothing_here")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})


async def test_auth_and_injected_503_bodies() -> None:
    sim = SimulatedServer(SimulatedConfig(api_key="k"))
    async with httpx.AsyncClient(transport=sim.transport(), base_url=URL) as http:
        denied = await http.post("/generate", json={"input_ids": [1]})
        assert (denied.status_code, denied.json()) == (401, {"error": "Unauthorized"})
        assert (await http.get("/health")).status_code == 200
        sim.engine.faults.fail_generate = 1
        headers = {"Authorization": "Bearer k"}
        failed = await http.post("/generate", json={"input_ids": [1]}, headers=headers)
        assert failed.status_code == 503
        assert failed.json()["object"] == "error"
        assert failed.json()["code"] == 503


async def test_batch_rids_and_n_samples(raw: httpx.AsyncClient) -> None:
    body = {"input_ids": [[1, 2], [3]], "rid": "base", "sampling_params": {"max_new_tokens": 3}}
    batch = (await raw.post("/generate", json=body)).json()
    assert [item["meta_info"]["id"] for item in batch] == ["base_0", "base_1"]
    single = {"input_ids": [1, 2], "rid": "mine", "sampling_params": {"max_new_tokens": 3, "n": 2}}
    samples = (await raw.post("/generate", json=single)).json()
    assert isinstance(samples, list)
    assert len(samples) == 2
    assert "mine" not in {s["meta_info"]["id"] for s in samples}
    one = (await raw.post("/generate", json={"input_ids": [1], "rid": "solo"})).json()
    assert one["meta_info"]["id"] == "solo"


async def _events(raw: httpx.AsyncClient, body: dict[str, Any]) -> list[Any]:
    response = await raw.post("/generate", json={**body, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = [c for c in response.text.split("\n\n") if c]
    assert chunks[-1] == "data: [DONE]"
    return [msgspec.json.decode(c.removeprefix("data: ")) for c in chunks[:-1]]


async def test_batch_streams_carry_an_index(raw: httpx.AsyncClient) -> None:
    body = {"input_ids": [[1], [2]], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    events = await _events(raw, body)
    assert sorted({e["index"] for e in events}) == [0, 1]
    finals = [e for e in events if e["meta_info"]["finish_reason"]]
    assert len(finals) == 2
    assert all(f["meta_info"]["weight_versions"] for f in finals)


async def test_cumulative_stream_shapes(raw: httpx.AsyncClient) -> None:
    body = {"input_ids": [1], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}  # fmt: skip
    events = await _events(raw, body)
    assert [len(e["output_ids"]) for e in events] == [1, 2, 3, 4]
    assert [e["meta_info"]["completion_tokens"] for e in events] == [1, 2, 3, 4]
    assert [e["meta_info"]["finish_reason"] for e in events][:3] == [None] * 3
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    entries = events[-1]["meta_info"]["output_token_logprobs"]
    assert [entry[1] for entry in entries] == events[-1]["output_ids"]


async def test_requests_wait_at_the_pause_gate_and_abort_from_the_queue(
    sim: SimulatedServer, raw: httpx.AsyncClient
) -> None:
    await raw.post("/pause_generation", json={"mode": "retract"})
    answers: list[Any] = []

    async def queued() -> None:
        answers.append((await raw.post("/generate", json={"input_ids": [1]})).json())

    async with anyio.create_task_group() as group:
        group.start_soon(queued)
        await anyio.sleep(0.02)
        assert not answers
        await raw.post("/abort_request", json={"abort_all": True})
    meta = answers[0]["meta_info"]
    assert meta["finish_reason"]["message"] == "Abort in waiting queue"
    assert "prompt_tokens" not in meta
    assert "cached_tokens" not in meta


async def test_control_response_shapes(raw: httpx.AsyncClient) -> None:
    pause = await raw.post("/pause_generation", json={})
    assert pause.json() == {"message": "Generation paused successfully.", "status": "ok"}
    resume = await raw.post("/continue_generation", json={})
    assert resume.json() == {"message": "Generation continued successfully.", "status": "ok"}
    abort = await raw.post("/abort_request", json={"rid": "nobody"})
    assert (abort.status_code, abort.content) == (200, b"")
    release = await raw.post("/release_memory_occupation", json={})
    assert release.content == b"null"
    flush = await raw.get("/flush_cache")
    assert flush.headers["content-type"].startswith("text/plain")
    bad_mode = await raw.post("/pause_generation", json={"mode": "sideways"})
    assert bad_mode.status_code == 400


async def test_tokens_arrive_at_the_configured_rate_and_requests_are_independent() -> None:
    sim = SimulatedServer(SimulatedConfig(token_latency_s=0.01))
    body = {"input_ids": [5], "sampling_params": {"max_new_tokens": 20, "ignore_eos": True}}
    async with httpx.AsyncClient(transport=sim.transport(), base_url=URL) as http:
        start = anyio.current_time()
        await http.post("/generate", json=body)
        single = anyio.current_time() - start

        async def one(i: int) -> None:
            await http.post("/generate", json={**body, "input_ids": [i]})

        start = anyio.current_time()
        async with anyio.create_task_group() as group:
            for i in range(8):
                group.start_soon(one, i)
        together = anyio.current_time() - start
    assert 0.19 <= single < 1.0
    assert 0.19 <= together < 1.0  # one after another would take 1.6 s


async def test_sim_hooks_over_http(sim: SimulatedServer, raw: httpx.AsyncClient) -> None:
    faults = await raw.post("/_sim/faults", json={"fail_generate": 1, "fail_status": 502})
    assert faults.json()["fail_generate"] == 1
    assert (await raw.post("/generate", json={"input_ids": [1]})).status_code == 502
    assert (await raw.post("/_sim/faults", json={"nope": 1})).status_code == 400
    stats = (await raw.get("/_sim/stats")).json()
    assert (stats["generate_requests"], stats["bodies"], stats["in_flight"]) == (0, 1, 0)
    loads = (await raw.get("/v1/loads")).json()
    assert loads["loads"][0]["num_running_reqs"] == 0


def test_command_line_flags() -> None:
    host, port, config = parse_args(
        ["--port", "31000", "--token-latency-s", "0.05", "--incremental-streaming-output",
         "--legacy", "--api-key", "k", "--tp-size", "2"]
    )  # fmt: skip
    assert (host, port) == ("127.0.0.1", 31000)
    assert config.token_latency_s == 0.05
    assert config.stream_output == "incremental"
    assert config.legacy
    assert config.api_key == "k"
    assert parse_args(["--stream-output", "mixed"])[2].stream_output == "mixed"
