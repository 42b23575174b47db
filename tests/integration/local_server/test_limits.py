"""Requests that must not hurt the server: oversized, deeply nested, absurd ``n``, no key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

PROMPT = [1, 5, 6, 14, 7, 17]
SMALL = {"max_new_tokens": 2, "temperature": 0}
POST_ROUTES = (
    "/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/abort_request",
    "/pause_generation",
    "/continue_generation",
    "/update_weights_from_disk",
    "/init_weights_update_group",
    "/update_weights_from_distributed",
    "/destroy_weights_update_group",
    "/begin_weight_update",
    "/end_weight_update",
)
JSON = {"Content-Type": "application/json"}


async def still_serves(client: httpx.AsyncClient) -> None:
    reply = await client.post("/generate", json={"input_ids": PROMPT, "sampling_params": SMALL})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["output_ids"]) == 2


async def test_a_20_mb_body_gets_413_and_the_server_stays_up(client: httpx.AsyncClient) -> None:
    text = "1" * (20 * 2**20)
    with anyio.fail_after(30):
        reply = await client.post(
            "/generate", content=f'{{"text": "{text}"}}'.encode(), headers=JSON
        )
    assert reply.status_code == 413
    assert reply.json()["code"] == 413
    assert "8388608 bytes" in reply.json()["message"]
    await still_serves(client)


async def test_a_chunked_body_over_the_limit_gets_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        for _ in range(10):
            yield b"1" * 2**20
        yield b'"}'

    with anyio.fail_after(30):
        reply = await client.post("/v1/completions", content=chunks(), headers=JSON)
    assert reply.status_code == 413
    await still_serves(client)


@pytest.mark.parametrize("route", POST_ROUTES)
async def test_deep_or_malformed_json_is_a_400_on_every_route(
    client: httpx.AsyncClient, route: str
) -> None:
    deep = b'{"input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for content in (deep, b"[" * 200_000, b"{not json"):
        reply = await client.post(route, content=content, headers=JSON)
        assert reply.status_code == 400, (route, reply.text)
        assert reply.json()
    await still_serves(client)


async def test_n_and_batch_sizes_are_capped(client: httpx.AsyncClient) -> None:
    many = await client.post(
        "/generate", json={"input_ids": PROMPT, "sampling_params": {**SMALL, "n": 65}}
    )
    assert (many.status_code, many.json()) == (
        400,
        {"error": {"message": "n must be at most 64, got 65."}},
    )
    completions = await client.post("/v1/completions", json={"prompt": "1", "n": 1000})
    assert completions.status_code == 400
    assert completions.json()["message"] == "n must be at most 64, got 1000."
    prompts = await client.post("/generate", json={"input_ids": [[1]] * 5000})
    assert prompts.status_code == 400
    assert "at most 4096 sequences" in prompts.json()["error"]["message"]
    await still_serves(client)


async def test_lengths_are_checked_before_tokenizing(client: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        reply = await client.post("/generate", json={"text": "1" * 5_000_000})
    assert reply.status_code == 400
    assert "longer than the model's context length" in reply.json()["error"]["message"]
    chat = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "1" * 2_000_000}]}
    )
    assert chat.status_code == 400
    for max_tokens in (10**9, 2**63):
        over = await client.post("/v1/completions", json={"prompt": "1", "max_tokens": max_tokens})
        assert over.status_code == 400, over.text
    native = await client.post(
        "/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2**62}}
    )
    assert native.status_code == 400
    await still_serves(client)


async def test_control_routes_need_the_key(client: httpx.AsyncClient, server: Any) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as anonymous:
        for route in ("/pause_generation", "/update_weights_from_disk", "/abort_request"):
            denied = await anonymous.post(route, json={"abort_all": True, "model_path": "/x"})
            assert (denied.status_code, denied.json()) == (401, {"error": "Unauthorized"})
        assert (await anonymous.get("/health")).status_code == 200
    info = (await client.get("/server_info")).json()
    assert info["internal_states"][0]["paused"] is None
    await still_serves(client)
