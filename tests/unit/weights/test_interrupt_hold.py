"""An ``interrupt`` hold against a request that reaches its server after ``pause(abort)``:
the server holds it at its gate until continue, so its lease would never drain; the hold cuts
it after a grace and the generator re-sends it once routing resumes (on the new weights)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from nexrl_async.config.inference import AttachInference
from nexrl_async.config.rollout import SamplingConfig
from nexrl_async.core.errors import EngineUnavailable
from nexrl_async.engine.fleet_generator import FleetGenerator
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.router import LeaseCut, Router, ServerHandle
from nexrl_async.testing.simulated import SimulatedServer

from .conftest import make_sims, open_clients
from .test_publisher import disk

URL = "http://sim0"


class RouterFleet:
    """A real :class:`Router` as the publisher's ``Routing`` and the generator's fleet."""

    def __init__(self) -> None:
        self.cfg = AttachInference(urls=[URL], health_timeout_s=1.0)
        self.servers = [ServerHandle(0, URL, max_concurrency=4)]
        self.router = Router(self.servers)
        self.router.mark_up(self.servers[0])
        self.lease = self.router.lease
        self.stick = self.router.stick
        self.pause_routing = self.router.pause
        self.resume_routing = self.router.resume
        self.wait_drained = self.router.wait_drained
        self.cut_running = self.router.cut_running


class LateSender:
    """The backend of a request whose bytes reach the server only after its pause(abort)."""

    def __init__(self, client: SGLangClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.client = client
        self.leased, self.paused = anyio.Event(), anyio.Event()
        self.sent = 0
        pause = client.pause_generation

        async def pause_then_tell(*args: Any, **kwargs: Any) -> None:
            await pause(*args, **kwargs)
            self.paused.set()

        monkeypatch.setattr(client, "pause_generation", pause_then_tell)

    async def generate(self, input_ids: list[int], params: Any) -> Any:
        self.leased.set()
        await self.paused.wait()
        self.sent += 1
        return await self.client.generate(input_ids, params)


@pytest.fixture
async def rig() -> AsyncIterator[tuple[SimulatedServer, SGLangClient]]:
    sims = make_sims(1)
    async for clients in open_clients(sims):
        yield sims[URL], clients[URL]


async def test_a_request_gated_after_pause_abort_is_cut_and_resent_on_the_new_weights(
    tmp_path: Path, rig: tuple[SimulatedServer, SGLangClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, client = rig
    fleet = RouterFleet()
    publisher, _ = disk(tmp_path, fleet, {URL: client}, inflight="interrupt")  # type: ignore[arg-type]
    publisher.interrupt_grace_s = 0.05
    late = LateSender(client, monkeypatch)
    gen = FleetGenerator(
        fleet,  # type: ignore[arg-type]
        {URL: late},  # type: ignore[dict-item]
        current_version=lambda: publisher.version,
        retries=0,
    )
    turns: list[Any] = []

    async def generate() -> None:
        turns.append(
            await gen.generate(
                [1, 2, 3], max_new_tokens=4, sampling=SamplingConfig(), sticky_key="k"
            )
        )

    with anyio.fail_after(4.0):  # the publication's own step timeout is 5 s
        async with anyio.create_task_group() as tg:
            tg.start_soon(generate)
            await late.leased.wait()
            stats = await publisher.publish(1)
    assert stats.version == 1
    assert late.sent == 2  # cut once at the gate, re-sent after the publication
    assert turns[0].weight_version == 1
    assert fleet.servers[0].active == 0
    assert list(sim.engine.stats.pauses) == ["abort"]


async def test_cut_leases_raise_a_retryable_error_and_the_server_stays_routable() -> None:
    server = ServerHandle(0, URL, max_concurrency=2)
    router = Router([server])
    router.mark_up(server)
    entered = anyio.Event()
    raised: list[Exception] = []

    async def hold() -> None:
        try:
            async with router.lease("k"):
                entered.set()
                await anyio.sleep_forever()
        except EngineUnavailable as err:
            raised.append(err)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await entered.wait()
        assert router.cut_running(server, "held at a paused server's gate") == 1
    assert [type(err) for err in raised] == [LeaseCut]
    assert server.available
    assert (server.active, server.outstanding) == (0, 0)
    async with router.lease("k") as again:
        assert again is server
