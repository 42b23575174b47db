"""Publication that outlives a server crash, against simulated servers and a faked fleet view.

The fleet's view of a server is its ``ServerHandle.available``: tests flip it the way the
supervisor does when a process exits (``mark_down``) or a restart completes (``mark_up``, after
``on_restart``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import EngineUnavailable, WeightSyncError
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.testing.simulated import SimulatedServer
from nexrl_async.weights import Publisher, WeightPublisher
from nexrl_async.weights.steps import Targets

from .conftest import Routing
from .test_publisher import exporter

URL0, URL1 = "http://sim0", "http://sim1"


def disk(
    tmp_path: Path, routing: Routing, clients: dict[str, SGLangClient], **cfg: Any
) -> WeightPublisher:
    values: dict[str, Any] = {"step_timeout_s": 5.0, "retries": 0, **cfg}
    return WeightPublisher(
        WeightsConfig(**values),
        fleet=routing,
        clients=clients,
        weights_dir=tmp_path / "weights",
        export=exporter([]),
        initial_path=tmp_path / "initial",
    )


def failing_loads(
    client: SGLangClient, times: int, before_raise: Callable[[], object] = lambda: None
) -> list[float]:
    """Make ``client``'s next ``times`` disk loads raise like a dead socket; their times."""
    real = client.update_weights_from_disk
    calls: list[float] = []

    async def load(*args: Any, **kwargs: Any) -> Any:
        calls.append(anyio.current_time())
        if len(calls) <= times:
            before_raise()
            raise EngineUnavailable(f"{client.base_url}: ConnectError")
        return await real(*args, **kwargs)

    client.update_weights_from_disk = load  # type: ignore[method-assign]
    return calls


def versions(sims: dict[str, SimulatedServer]) -> dict[str, str | None]:
    return {url: sim.engine.weight_version for url, sim in sims.items()}


async def test_a_down_server_is_skipped_and_restored_on_restart(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher = disk(tmp_path, routing, clients)
    down = routing.handle(URL1)
    down.available = False  # the fleet marked it down (process exited)
    stats = await publisher.publish(1)
    assert stats.version == publisher.version == 1
    assert versions(sims) == {URL0: "1", URL1: "0"}
    assert not sims[URL1].engine.stats.weight_updates  # never addressed
    assert (routing.handle(URL0).weight_version, down.weight_version) == ("1", None)
    await publisher.on_restart(down)  # the fleet's hook once the relaunch is healthy
    assert versions(sims) == {URL0: "1", URL1: "1"}
    assert down.weight_version == "1"  # verified before it takes traffic


async def test_a_server_dying_mid_transfer_is_dropped_not_fatal(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher = disk(tmp_path, routing, clients, inflight="interrupt")
    routing.busy()
    victim = routing.handle(URL1)

    def die() -> None:
        victim.available = False

    failing_loads(clients[URL1], times=99, before_raise=die)
    with anyio.fail_after(5):
        assert (await publisher.publish(1)).version == 1
    assert versions(sims) == {URL0: "1", URL1: "0"}
    assert routing.events[-1] == "resume"
    assert sims[URL0].engine.stats.continues == 1
    assert sims[URL1].engine.stats.continues == 0  # nothing sent to it once down


async def test_a_failure_noticed_before_the_fleet_marks_the_server_down(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    """The connection fails first, the supervisor sees the exit a moment later: the retry
    window outlasts ``retries`` (0 here), so the publication skips the server, not fails."""
    publisher = disk(tmp_path, routing, clients, retry_window_s=30.0)
    calls = failing_loads(clients[URL1], times=99)

    async def supervisor_notices() -> None:
        await anyio.sleep(0.5)
        routing.handle(URL1).available = False

    start = anyio.current_time()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor_notices)
            await publisher.publish(1)
    assert versions(sims) == {URL0: "1", URL1: "0"}
    assert len(calls) >= 2  # retried past the budget while still routed
    assert anyio.current_time() - start < 2.0  # and stopped as soon as it was down


async def test_an_unanswering_server_is_retried_for_the_window(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher = disk(tmp_path, routing, clients, retry_window_s=30.0)
    calls = failing_loads(clients[URL1], times=3)  # back after ~1.4 s of backoff
    with anyio.fail_after(10):
        await publisher.publish(1)
    assert len(calls) == 4
    assert versions(sims) == {URL0: "1", URL1: "1"}


async def test_retries_give_up_once_the_window_has_passed(
    tmp_path: Path, routing: Routing, clients: dict[str, SGLangClient]
) -> None:
    publisher = disk(tmp_path, routing, clients, retry_window_s=0.5)
    calls = failing_loads(clients[URL1], times=99)
    with anyio.fail_after(10), pytest.raises(WeightSyncError, match="transfer failed on http"):
        await publisher.publish(1)
    assert 2 <= len(calls) <= 4
    assert publisher.version == 0


async def test_the_window_defaults_to_the_fleet_health_timeout(
    tmp_path: Path, clients: dict[str, SGLangClient]
) -> None:
    routing = Routing(list(clients), health_timeout_s=42.0)
    assert disk(tmp_path, routing, clients).window_s == 42.0
    assert disk(tmp_path, routing, clients, retry_window_s=7.0).window_s == 7.0


async def test_a_rejection_is_not_retried_past_the_budget(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher = disk(tmp_path, routing, clients, retries=1, retry_window_s=60.0)
    sims[URL1].engine.faults.weight_update_failures = 5  # success: false, a 4xx
    with anyio.fail_after(5), pytest.raises(WeightSyncError, match="after 2 attempts"):
        await publisher.publish(1)


async def test_every_server_down_still_advances_the_version(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher = disk(tmp_path, routing, clients)
    for server in routing.servers:
        server.available = False
    await publisher.publish(1)
    assert publisher.version == 1
    assert versions(sims) == {URL0: "0", URL1: "0"}
    for server in routing.servers:
        await publisher.on_restart(server)
    assert versions(sims) == {URL0: "1", URL1: "1"}


class _Forgetful:
    """A transport whose restore loads nothing: the restarted server keeps version 0."""

    name = "forgetful"
    atomic = False

    def capture(self, version: int) -> bool:
        return False

    async def prepare(self, version: int, targets: Targets) -> None:
        return None

    async def transfer(self, version: int, targets: Targets) -> int:
        for client in targets.live().values():
            await client.update_weight_version(version)
        return 0

    def committed(self, version: int) -> None:
        return None

    async def restore(self, server: Any, version: int) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_a_restore_is_verified_before_the_server_is_routed(
    routing: Routing, clients: dict[str, SGLangClient]
) -> None:
    cfg = WeightsConfig(step_timeout_s=5.0, retries=0)
    publisher = Publisher(cfg, fleet=routing, clients=clients, transport=_Forgetful())
    await publisher.publish(1)
    await clients[URL1].update_weight_version(0)  # relaunched: the launch weights again
    with pytest.raises(WeightSyncError, match="weights restore failed on http://sim1"):
        await publisher.on_restart(routing.handle(URL1))  # the fleet restarts it again


async def test_a_restart_waits_for_the_publication_in_progress(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    """The restart hook takes the publisher's lock: it loads the version being published."""
    publisher = disk(tmp_path, routing, clients)
    routing.handle(URL1).available = False
    gate = anyio.Event()
    order: list[str] = []

    async def slow_drain() -> None:
        order.append("hold")
        await gate.wait()

    routing.wait_drained = slow_drain  # type: ignore[method-assign]

    async def restart() -> None:
        await anyio.sleep(0.05)
        gate.set()
        await publisher.on_restart(routing.handle(URL1))
        order.append("restored")

    async def publish() -> None:
        await publisher.publish(1)
        order.append("published")

    tasks: list[Callable[[], Awaitable[None]]] = [publish, restart]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(task)
    assert order == ["hold", "published", "restored"]
    assert versions(sims) == {URL0: "1", URL1: "1"}
