"""The run's HTTP pool: requests spread over independent clients, all closed at exit."""

from __future__ import annotations

import anyio
import httpx
import pytest

from nexrl_async.inference.client.http import HttpPool, as_pool, open_http_pool
from nexrl_async.inference.client.sglang import SamplingParams, SGLangClient
from nexrl_async.testing.simulated import SimulatedServer


def test_pick_is_round_robin() -> None:
    clients = [httpx.AsyncClient() for _ in range(3)]
    pool = HttpPool(clients)
    assert [pool.pick() for _ in range(7)] == [*clients, *clients, clients[0]]


def test_as_pool_wraps_one_client_and_keeps_a_pool() -> None:
    client = httpx.AsyncClient()
    assert as_pool(client).clients == (client,)
    pool = HttpPool([client])
    assert as_pool(pool) is pool


def test_an_empty_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one client"):
        HttpPool([])


async def test_open_http_pool_closes_every_client() -> None:
    async with open_http_pool(3) as pool:
        assert len(pool.clients) == 3
        assert not any(c.is_closed for c in pool.clients)
    assert all(c.is_closed for c in pool.clients)


async def test_open_http_pool_refuses_zero_shards() -> None:
    with pytest.raises(ValueError, match="shards must be >= 1, got 0"):
        async with open_http_pool(0):
            pass


async def test_concurrent_generations_use_every_shard() -> None:
    sim = SimulatedServer()
    used: list[int] = []

    def counting(shard: int) -> httpx.AsyncBaseTransport:
        inner = sim.transport()

        class Counting(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                used.append(shard)
                return await inner.handle_async_request(request)

        return Counting()

    clients = [httpx.AsyncClient(transport=counting(i)) for i in range(4)]
    client = SGLangClient(SimulatedServer.ASGI_URL, http=HttpPool(clients), seed=0)
    params = SamplingParams(max_new_tokens=4)
    async with anyio.create_task_group() as group:
        for _ in range(8):
            group.start_soon(client.generate, [5, 6, 7], params)
    for c in clients:
        await c.aclose()
    assert sorted(used) == [0, 0, 1, 1, 2, 2, 3, 3]
