"""Control routes over HTTP: abort, pause / continue, weight updates, errors, shutdown."""

from __future__ import annotations

import itertools
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

PROMPT = [1, 5, 6, 14, 7, 17]
LONG = {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}


async def loads(client: httpx.AsyncClient) -> dict[str, int]:
    return (await client.get("/v1/loads")).json()["loads"][0]


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Wait until ``check()`` holds (polling the server over HTTP)."""
    with anyio.fail_after(timeout_s):
        for _ in itertools.count():
            if await check():
                return
            await anyio.sleep(0.01)


async def wait_running(client: httpx.AsyncClient) -> None:
    async def running() -> bool:
        return (await loads(client))["num_running_reqs"] > 0

    await poll(running)


async def test_abort_mid_stream_keeps_partial_tokens(client: httpx.AsyncClient) -> None:
    body = {"input_ids": PROMPT, "sampling_params": LONG, "stream": True, "rid": "to-abort"}
    chunks: list[Any] = []
    with anyio.fail_after(20):
        async with client.stream("POST", "/generate", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                chunks.append(data if data == "[DONE]" else json.loads(data))
                if len(chunks) == 3:
                    reply = await client.post("/abort_request", json={"rid": "to-abort"})
                    assert reply.status_code == 200
    assert chunks[-1] == "[DONE]"
    last = chunks[-2]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["finish_reason"]["message"] == "Aborted"
    assert 3 <= len(last["output_ids"]) < 400
    assert last["output_ids"][:3] == chunks[2]["output_ids"]


async def test_pause_abort_ends_running_and_holds_new(client: httpx.AsyncClient) -> None:
    results: dict[str, Any] = {}

    async def run(name: str, params: dict[str, Any]) -> None:
        reply = await client.post(
            "/generate", json={"input_ids": PROMPT, "sampling_params": params}
        )
        assert reply.status_code == 200
        results[name] = reply.json()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "running", LONG)
        await wait_running(client)
        paused = await client.post("/pause_generation", json={"mode": "abort"})
        assert paused.json() == {"message": "Generation paused successfully.", "status": "ok"}

        async def answered() -> bool:  # the aborted response may still be on its way
            return "running" in results

        await poll(answered, 5)
        assert results["running"]["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < len(results["running"]["output_ids"]) < 400
        tg.start_soon(run, "held", {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True})
        await anyio.sleep(0.5)
        assert "held" not in results
        assert await loads(client) == {"dp_rank": 0, "num_running_reqs": 0, "num_waiting_reqs": 0}
        resumed = await client.post("/continue_generation", json={})
        assert resumed.json()["status"] == "ok"
    assert results["held"]["meta_info"]["finish_reason"] == {"type": "length", "length": 3}


async def test_pause_retract_resumes_with_the_same_tokens(client: httpx.AsyncClient) -> None:
    params = {"max_new_tokens": 300, "temperature": 0, "ignore_eos": True}
    reference = (
        await client.post("/generate", json={"input_ids": PROMPT, "sampling_params": params})
    ).json()
    out: dict[str, Any] = {}

    async def run() -> None:
        out["r"] = (
            await client.post("/generate", json={"input_ids": PROMPT, "sampling_params": params})
        ).json()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_running(client)
        await client.post("/pause_generation", json={"mode": "retract"})
        assert (await loads(client))["num_running_reqs"] == 0
        assert (await client.post("/flush_cache")).status_code == 200
        await client.post("/continue_generation", json={})
    assert out["r"]["output_ids"] == reference["output_ids"]
    assert out["r"]["meta_info"]["num_retractions"] == 1


async def test_update_weights_from_disk(
    client: httpx.AsyncClient, model_dirs: tuple[Path, Path]
) -> None:
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
    before = (await client.post("/generate", json=body)).json()
    old_version = before["meta_info"]["weight_version"]
    try:
        reply = await client.post(
            "/update_weights_from_disk",
            json={"model_path": str(model_dirs[1]), "weight_version": "7"},
        )
        assert reply.status_code == 200
        assert reply.json()["success"] is True
        after = (await client.post("/generate", json=body)).json()
        assert after["meta_info"]["weight_version"] == "7"
        assert after["meta_info"]["weight_versions"][-1]["version"] == "7"
        assert after["output_ids"] != before["output_ids"]
        info = (await client.get("/model_info")).json()
        assert info["weight_version"] == "7"
        assert info["model_path"] == str(model_dirs[1])
        bad = await client.post("/update_weights_from_disk", json={"model_path": "/nonexistent"})
        assert bad.status_code == 400
        assert bad.json()["success"] is False
        assert (await client.get("/model_info")).json()["weight_version"] == "7"
    finally:
        restore = {"model_path": str(model_dirs[0]), "weight_version": old_version}
        assert (await client.post("/update_weights_from_disk", json=restore)).status_code == 200
    again = (await client.post("/generate", json=body)).json()
    assert again["output_ids"] == before["output_ids"]


async def test_error_statuses_and_bodies(client: httpx.AsyncClient, server: Any) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as anonymous:
        denied = await anonymous.post("/generate", json={"input_ids": PROMPT})
        assert (denied.status_code, denied.json()) == (401, {"error": "Unauthorized"})
        wrong = await anonymous.get("/model_info", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await anonymous.get("/health")).status_code == 200
    missing = await client.get("/no_such_route")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
    for route in ("/update_weights_from_tensor", "/release_memory_occupation"):
        assert (await client.post(route, json={})).status_code == 404
    too_long = await client.post(
        "/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 510}}
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["message"].startswith(
        "Requested token count exceeds the model's maximum context length of 512 tokens."
    )
    cases = {
        "top_p": (0.0, "top_p must be in (0, 1], got 0.0."),
        "top_k": (0, "top_k must be -1 (disable) or at least 1, got 0."),
        "temperature": (-1.0, "temperature must be non-negative, got -1.0."),
        "min_p": (2.0, "min_p must be in [0, 1], got 2.0."),
    }
    for key, (value, message) in cases.items():
        bad = await client.post(
            "/generate", json={"input_ids": PROMPT, "sampling_params": {key: value}}
        )
        assert (bad.status_code, bad.json()) == (400, {"error": {"message": message}})
    schema = await client.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"x": 1}})
    assert schema.status_code == 400
    assert isinstance(schema.json()["error"], str)
    chat = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "1"}], "top_p": 0.0},
    )
    assert chat.status_code == 400
    assert chat.json() == {
        "object": "error",
        "message": "top_p must be in (0, 1], got 0.0.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    huge = await client.post("/generate", json={"input_ids": [1] * 512})
    assert huge.json() == {
        "error": {
            "message": "The input (512 tokens) is longer than the model's context length "
            "(512 tokens)."
        }
    }
    outside = await client.post("/v1/completions", json={"prompt": [1, 99999], "max_tokens": 2})
    assert outside.status_code == 400
    assert outside.json()["message"] == "input_ids contain a token id outside the vocabulary."
    garbled = await client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert garbled.status_code == 400
    assert garbled.json()["type"] == "Bad Request"
    duplicate_rid = {"input_ids": [PROMPT, PROMPT], "rid": ["same", "same"]}
    dup = await client.post("/generate", json=duplicate_rid)
    assert dup.json() == {"error": {"message": "Duplicate request ID detected: same"}}


async def test_sigterm_aborts_streams_and_exits_cleanly(
    launch: Any, model_dirs: tuple[Path, Path]
) -> None:
    server = launch(model_dirs[0])
    body = {"input_ids": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 500}, "stream": True}
    events: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=20) as c:
        with anyio.fail_after(20):
            async with c.stream("POST", "/generate", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        if len(events) == 2:
                            server.proc.send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["meta_info"]["finish_reason"]["type"] == "abort"

    async def exited() -> bool:
        return server.proc.poll() is not None

    await poll(exited, 15)
    assert server.proc.returncode == 0, server.log.read_text()


@pytest.mark.parametrize("route", ["/flush_cache"])
async def test_flush_cache_when_idle(client: httpx.AsyncClient, route: str) -> None:
    reply = await client.get(route)
    assert reply.status_code == 200
    assert reply.text.startswith("Cache flushed.")


async def generated_tokens(client: httpx.AsyncClient) -> int:
    info = (await client.get("/server_info")).json()
    return int(info["internal_states"][0]["generated_tokens"])


async def test_client_disconnect_aborts_stream_and_plain_requests(
    client: httpx.AsyncClient, server: Any
) -> None:
    body = {"input_ids": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 500}}

    async def drained() -> bool:
        return (await loads(client))["num_running_reqs"] == 0

    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=20) as c:
        before = await generated_tokens(client)
        async with c.stream("POST", "/generate", json={**body, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # leave after the first chunk: the connection closes
        await poll(drained)
        assert await generated_tokens(client) - before < 500

        # A plain answer gets its disconnect watcher only once it has waited 0.2 s (most take
        # milliseconds): hold generation meanwhile, so the request is still unfinished when the
        # client leaves and only the watcher's abort can end it.
        before = await generated_tokens(client)
        await client.post("/pause_generation", json={"mode": "in_place"})
        try:
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/generate", json=body, timeout=httpx.Timeout(20, read=0.1))
            await anyio.sleep(0.6)  # > WATCH_AFTER_S + one sweep
        finally:
            await client.post("/continue_generation", json={})
        await poll(drained)
        assert await generated_tokens(client) - before < 500
