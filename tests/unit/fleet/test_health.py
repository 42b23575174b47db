"""Health supervision of attached servers, with the network swapped for an httpx MockTransport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from nexrl_async.config.inference import AttachInference
from nexrl_async.core.errors import EngineUnavailable
from nexrl_async.inference.fleet.supervisor import HEALTH_FAILURES, open_fleet


class FakeServers:
    """Answers every server's health routes with the status set here (``None``: refuse)."""

    def __init__(self) -> None:
        self.status: dict[str, int | None] = {"/health": 200, "/health_generate": 200}
        self.seen: list[tuple[str, str | None]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((str(request.url), request.headers.get("authorization")))
        status = self.status.get(request.url.path, 404)
        if status is None:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(status)


@pytest.fixture
def fake() -> FakeServers:
    return FakeServers()


@pytest.fixture
async def http(fake: FakeServers) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake.handle)) as client:
        yield client


def attach(**fields: object) -> AttachInference:
    values: dict[str, object] = {"urls": ["http://a:1/", "http://b:2"], "health_interval_s": 0.02}
    values.update(fields)
    return AttachInference(**values)  # type: ignore[arg-type]


async def wait_for(condition: object, timeout_s: float = 2.0) -> None:
    with anyio.fail_after(timeout_s):
        while True:
            if callable(condition) and condition():
                return
            await anyio.sleep(0.01)


async def test_attached_fleet_is_ready_once_healthy_and_sends_the_key(
    tmp_path: Path, fake: FakeServers, http: httpx.AsyncClient
) -> None:
    with anyio.fail_after(2):
        async with open_fleet(
            attach(api_key="k"), model_dir=tmp_path, log_dir=tmp_path, http=http
        ) as fleet:
            assert fleet.urls == ["http://a:1", "http://b:2"]
            assert all(server.available and not server.launched for server in fleet.servers)
    assert ("http://a:1/health", "Bearer k") in fake.seen
    assert ("http://b:2/health_generate", "Bearer k") in fake.seen


async def test_not_ready_until_health_generate_answers(
    tmp_path: Path, fake: FakeServers, http: httpx.AsyncClient
) -> None:
    fake.status["/health_generate"] = 503  # /health fine, model not warmed up yet
    with anyio.move_on_after(0.3) as waited:
        async with open_fleet(attach(), model_dir=tmp_path, log_dir=tmp_path, http=http):
            pytest.fail("ready while /health_generate answers 503")
    assert waited.cancelled_caught
    fake.status["/health_generate"] = 404  # a server without the route is healthy on /health
    with anyio.fail_after(2):
        async with open_fleet(attach(), model_dir=tmp_path, log_dir=tmp_path, http=http) as fleet:
            assert all(server.available for server in fleet.servers)


async def test_failed_checks_take_a_server_down_except_while_paused(
    tmp_path: Path, fake: FakeServers, http: httpx.AsyncClient
) -> None:
    async with open_fleet(attach(), model_dir=tmp_path, log_dir=tmp_path, http=http) as fleet:
        fleet.pause_routing()  # a publication: SGLang health generation may stall meanwhile
        fake.status["/health"] = 503
        checks = len(fake.seen)
        await wait_for(lambda: len(fake.seen) > checks + 4 * HEALTH_FAILURES)
        assert all(server.available for server in fleet.servers)
        fleet.resume_routing()
        fake.status["/health"] = None  # connection refused counts as a failure too
        await wait_for(lambda: not any(server.available for server in fleet.servers))
        assert "health checks failed in a row (last: no answer)" in fleet.servers[0].down_reason
        fake.status["/health"] = 200
        await wait_for(lambda: all(server.available for server in fleet.servers))
        assert fleet.restart_count == 0  # attached servers are never restarted


async def test_attached_server_down_past_its_deadline_fails_the_fleet(
    tmp_path: Path, fake: FakeServers, http: httpx.AsyncClient
) -> None:
    cfg = attach(urls=["http://a:1"], health_timeout_s=0.3)
    expected = pytest.RaisesExc(
        EngineUnavailable, match=r"inference server 0 \(http://a:1\) not healthy within 0.3s"
    )
    with anyio.fail_after(3), pytest.RaisesGroup(expected):
        async with open_fleet(cfg, model_dir=tmp_path, log_dir=tmp_path, http=http):
            fake.status["/health"] = None
            await anyio.sleep_forever()
