"""The publication state machine and the disk transport, against simulated servers."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import WeightSyncError
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.testing.simulated import SimulatedServer
from nexrl_async.weights import DiskTransport, Publisher, WeightPublisher
from nexrl_async.weights.steps import Targets

from .conftest import Routing


def exporter(calls: list[Path]):  # type: ignore[no-untyped-def]
    def export(path: Path) -> None:
        calls.append(path)
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"x" * 100)
        (path / "config.json").write_text("{}")

    return export


def disk(
    tmp_path: Path, routing: Routing, clients: dict[str, SGLangClient], **cfg: object
) -> tuple[WeightPublisher, list[Path]]:
    calls: list[Path] = []
    publisher = WeightPublisher(
        WeightsConfig(step_timeout_s=5.0, retries=1, **cfg),  # type: ignore[arg-type]
        fleet=routing,
        clients=clients,
        weights_dir=tmp_path / "weights",
        export=exporter(calls),
        initial_path=tmp_path / "initial",
    )
    return publisher, calls


async def test_disk_publication_loads_verifies_flushes_and_prunes(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher, calls = disk(tmp_path, routing, clients, keep_versions=2)
    for version in (1, 2, 3):
        stats = await publisher.publish(version)
        assert (stats.version, stats.bytes) == (version, 102)
        assert 0 <= stats.transfer_s <= stats.pause_s <= stats.total_s
    assert routing.events == ["pause", "drained", "resume"] * 3
    assert calls == [tmp_path / "weights" / f"v{v}.tmp" for v in (1, 2, 3)]
    for sim in sims.values():
        updates = list(sim.engine.stats.weight_updates)
        assert [u["version"] for u in updates] == ["1", "2", "3"]
        assert updates[-1]["model_path"] == str(tmp_path / "weights" / "v3")
        assert sim.engine.weight_version == "3"
        assert sim.engine.stats.flushes == 6  # the update's own flush, then the flush step
        assert not sim.engine.stats.pauses  # drain mode never pauses the servers
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["v2", "v3"]
    assert publisher.version == 3


async def test_interrupt_mode_pauses_and_continues_every_server(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher, _ = disk(tmp_path, routing, clients, inflight="interrupt")
    routing.busy()
    await publisher.publish(1)
    for sim in sims.values():
        assert list(sim.engine.stats.pauses) == ["abort"]
        assert sim.engine.stats.continues == 1


@pytest.mark.parametrize("inflight", ["interrupt", "in_place"])
async def test_only_servers_with_requests_running_are_paused(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
    inflight: str,
) -> None:
    publisher, _ = disk(tmp_path, routing, clients, inflight=inflight)
    routing.busy("http://sim1")
    await publisher.publish(1)
    assert not sims["http://sim0"].engine.stats.pauses  # idle: no pause, no continue
    assert sims["http://sim0"].engine.stats.continues == 0
    assert len(sims["http://sim1"].engine.stats.pauses) == 1
    assert sims["http://sim1"].engine.stats.continues == 1
    assert all(sim.engine.weight_version == "1" for sim in sims.values())


async def test_a_failing_server_fails_the_publication_by_name_and_generation_resumes(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher, _ = disk(tmp_path, routing, clients, inflight="interrupt")
    routing.busy()
    sims["http://sim1"].engine.faults.weight_update_failures = 2  # both attempts fail
    with pytest.raises(WeightSyncError, match=r"weights transfer failed on http://sim1 after 2"):
        await publisher.publish(1)
    assert routing.events[-1] == "resume"
    for sim in sims.values():
        assert sim.engine.stats.continues == 1  # best-effort continue after the failure
    assert publisher.version == 0
    sims["http://sim1"].engine.faults.weight_update_failures = 1  # one retry is enough
    assert (await publisher.publish(1)).version == 1


class _NoTransfer:
    """A transport that moves nothing: the servers keep their old version."""

    name = "none"

    async def prepare(self, version: int, targets: Targets) -> None:
        return None

    async def transfer(self, version: int, targets: Targets) -> int:
        return 0

    def committed(self, version: int) -> None:
        raise AssertionError("never committed")

    async def restore(self, server: ServerHandle, version: int) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_verify_catches_a_server_without_the_new_version(
    routing: Routing, clients: dict[str, SGLangClient]
) -> None:
    cfg = WeightsConfig(step_timeout_s=5.0, retries=0)
    publisher = Publisher(cfg, fleet=routing, clients=clients, transport=_NoTransfer())
    with pytest.raises(WeightSyncError, match=r"weights verify failed on http://sim\d"):
        await publisher.publish(1)
    assert routing.events == ["pause", "drained", "resume"]


async def test_a_hung_step_times_out(routing: Routing, clients: dict[str, SGLangClient]) -> None:
    class Hanging(_NoTransfer):
        async def transfer(self, version: int, targets: Targets) -> int:
            await anyio.sleep_forever()
            return 0

    routing_hang = Routing(list(clients))

    async def never_drains() -> None:
        await anyio.sleep_forever()

    routing_hang.wait_drained = never_drains  # type: ignore[method-assign]
    cfg = WeightsConfig(step_timeout_s=0.2, retries=0)
    publisher = Publisher(cfg, fleet=routing_hang, clients=clients, transport=Hanging())
    with anyio.fail_after(5), pytest.raises(TimeoutError):
        await publisher.publish(1)
    assert routing_hang.events == ["pause", "resume"]


async def test_restart_reloads_the_current_folder(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher, _ = disk(tmp_path, routing, clients)
    handle = ServerHandle(1, "http://sim1", max_concurrency=4)
    await publisher.on_restart(handle)  # version 0: the relaunched server already has it
    assert not sims["http://sim1"].engine.stats.weight_updates
    await publisher.publish(1)
    await publisher.on_restart(handle)
    updates = list(sims["http://sim1"].engine.stats.weight_updates)
    assert [u["model_path"] for u in updates] == [str(tmp_path / "weights" / "v1")] * 2
    assert isinstance(publisher.transport, DiskTransport)
    assert publisher.transport.current_path == tmp_path / "weights" / "v1"


async def test_in_place_mode_freezes_swaps_and_continues_without_drain_or_flush(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    publisher, _ = disk(tmp_path, routing, clients, inflight="in_place")
    routing.busy()
    await publisher.publish(1)
    assert routing.events == ["pause", "resume"]  # routing held, nothing waited for
    for sim in sims.values():
        assert list(sim.engine.stats.pauses) == ["in_place"]
        assert sim.engine.stats.continues == 1
        assert sim.engine.stats.flushes == 0  # requests keep their KV: no flush asked for
        assert sim.engine.weight_version == "1"


async def test_unresolved_auto_inflight_drains(
    tmp_path: Path, routing: Routing, clients: dict[str, SGLangClient]
) -> None:
    publisher, _ = disk(tmp_path, routing, clients, inflight="auto")
    assert publisher.inflight == "drain"
    await publisher.publish(1)
    assert routing.events == ["pause", "drained", "resume"]


async def test_the_version_owner_advances_only_after_every_server_verified(
    tmp_path: Path,
    routing: Routing,
    sims: dict[str, SimulatedServer],
    clients: dict[str, SGLangClient],
) -> None:
    class Gate:
        """The engine's owner of the version (the flow), as the publisher sees it."""

        def __init__(self) -> None:
            self.version = 0
            self.seen_by_servers: list[list[str]] = []

        async def advance(self, version: int) -> None:
            self.seen_by_servers.append([s.engine.weight_version for s in sims.values()])
            self.version = version

    gate = Gate()
    publisher, _ = disk(tmp_path, routing, clients)
    publisher.versions = gate
    sims["http://sim1"].engine.faults.weight_update_failures = 2  # both attempts fail
    with pytest.raises(WeightSyncError):
        await publisher.publish(1)
    assert gate.version == publisher.version == 0  # a failed publication advances nothing
    assert (await publisher.publish(1)).version == 1
    assert gate.version == publisher.version == 1
    assert gate.seen_by_servers == [["1", "1"]]  # advanced once every server served it
