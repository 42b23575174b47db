"""Fixtures: a simulated SGLang server reached in-process (httpx.ASGITransport, no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from nexrl_async.inference.client.sglang import RetryPolicy, SGLangClient
from nexrl_async.testing.simulated import SimulatedConfig, SimulatedServer

FAST_RETRY = RetryPolicy(base_delay_s=0.001, max_delay_s=0.005)


@pytest.fixture
def sim() -> SimulatedServer:
    return SimulatedServer(SimulatedConfig(mean_output_tokens=12))


@pytest.fixture
async def http(sim: SimulatedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=sim.transport()) as client:
        yield client


@pytest.fixture
def make_client(http: httpx.AsyncClient) -> Callable[..., SGLangClient]:
    def make(**kwargs: Any) -> SGLangClient:
        kwargs.setdefault("backoff", FAST_RETRY)
        kwargs.setdefault("seed", 0)
        return SGLangClient(SimulatedServer.ASGI_URL, http=http, **kwargs)

    return make


@pytest.fixture
def client(make_client: Callable[..., SGLangClient]) -> SGLangClient:
    return make_client()


Spawn = Callable[..., tuple[SimulatedServer, SGLangClient]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Factory: ``spawn(config_field=..., client=dict(...))`` → (server, client) pair."""
    opened: list[httpx.AsyncClient] = []

    def make(
        client: dict[str, Any] | None = None, **config: Any
    ) -> tuple[SimulatedServer, SGLangClient]:
        config.setdefault("mean_output_tokens", 12)
        server = SimulatedServer(SimulatedConfig(**config))
        http = httpx.AsyncClient(transport=server.transport())
        opened.append(http)
        kwargs = {"backoff": FAST_RETRY, "seed": 0, **(client or {})}
        return server, SGLangClient(SimulatedServer.ASGI_URL, http=http, **kwargs)

    yield make
    for http in opened:
        await http.aclose()
