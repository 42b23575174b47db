"""Simulated SGLang servers in-process (no sockets), clients to them, a recording fleet."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx
import pytest

from nexrl_async.config.inference import AttachInference
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.testing.simulated import SimulatedConfig, SimulatedServer


class Routing:
    """The fleet as the publisher sees it; records what happened to routing. ``servers``: the
    fleet's view of server health (``ServerHandle.available``), flipped by tests."""

    def __init__(self, urls: Sequence[str] = (), *, health_timeout_s: float = 1.0) -> None:
        self.events: list[str] = []
        self.cfg = AttachInference(urls=list(urls), health_timeout_s=health_timeout_s)
        self.servers: list[ServerHandle] = []
        for i, url in enumerate(urls):
            self.servers.append(ServerHandle(i, url, max_concurrency=4, launched=True))
            self.servers[-1].available = True

    def handle(self, url: str) -> ServerHandle:
        return next(s for s in self.servers if s.url == url)

    def busy(self, *urls: str) -> None:
        """Requests of the engine run on ``urls`` (every server when none is named)."""
        for server in self.servers:
            if not urls or server.url in urls:
                server.active = 1

    def pause_routing(self) -> None:
        self.events.append("pause")

    def resume_routing(self) -> None:
        self.events.append("resume")

    async def wait_drained(self) -> None:
        self.events.append("drained")

    def cut_running(self, server: ServerHandle, reason: str) -> int:
        self.events.append(f"cut {server.url}")
        return 0


@pytest.fixture
def routing(sims: dict[str, SimulatedServer]) -> Routing:
    return Routing(list(sims))


def make_sims(count: int, *, legacy: bool = False) -> dict[str, SimulatedServer]:
    config = SimulatedConfig(weight_version="0", legacy=legacy)
    return {f"http://sim{i}": SimulatedServer(config) for i in range(count)}


@pytest.fixture
def sims() -> dict[str, SimulatedServer]:
    return make_sims(2)


async def open_clients(
    sims: dict[str, SimulatedServer],
) -> AsyncIterator[dict[str, SGLangClient]]:
    mounts = {url: sim.transport() for url, sim in sims.items()}
    async with httpx.AsyncClient(mounts=mounts, timeout=None) as http:  # type: ignore[arg-type]
        yield {url: SGLangClient(url, http=http, retries=0) for url in sims}


@pytest.fixture
async def clients(sims: dict[str, SimulatedServer]) -> AsyncIterator[dict[str, SGLangClient]]:
    async for made in open_clients(sims):
        yield made
