"""The distributed transport's HTTP choreography against simulated servers, with a fake sender.

The simulated servers accept the group and update routes without collectives; the fake sender
records what the transport asked of it and can block like a broadcast nobody receives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import pytest
import torch

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import EngineUnavailable, WeightSyncError
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.testing.simulated import SimulatedServer
from nexrl_async.weights import DistributedTransport, Publisher
from nexrl_async.weights.distributed import reachable_address
from nexrl_async.weights.sender import Bucket, LoadFormat, plan_buckets

from .conftest import Routing, make_sims, open_clients


def params() -> list[tuple[str, torch.Tensor]]:
    big = torch.zeros(2**18)  # 1 MiB: three buckets at bucket_mb = 1
    return [("a", big), ("b", big.clone()), ("c", torch.ones(3, dtype=torch.bfloat16))]


class FakeSender:
    """Records calls; ``block`` makes ``send_buckets`` wait (like gloo) until aborted."""

    def __init__(self, block: bool, stuck_connect: bool, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.port = 4242
        self.block = block
        self.stuck_connect = stuck_connect
        self.aborted = threading.Event()
        self.calls: list[str] = []

    def connect(self) -> None:
        self.calls.append("connect")
        if self.stuck_connect:  # like a rendezvous: deaf to abort(), bounded by its timeout
            threading.Event().wait(3)
            raise WeightSyncError("rendezvous timed out")

    def plan(self, named: Iterable[tuple[str, torch.Tensor]], *, bucket_mb: int) -> list[Bucket]:
        return plan_buckets(named, bucket_mb=bucket_mb)

    def send_buckets(self, buckets: Sequence[Bucket], load_format: LoadFormat = None) -> int:
        self.calls.append(f"send {len(buckets)} {load_format}")
        if self.block and not self.aborted.wait(10):
            raise AssertionError("never aborted")
        if self.aborted.is_set():
            raise WeightSyncError("weight broadcast aborted")
        return sum(b.nbytes for b in buckets)

    def abort(self) -> None:
        self.calls.append("abort")
        self.aborted.set()

    def close(self) -> None:
        self.calls.append("close")


class Factory:
    def __init__(self, *, block: bool = False, stuck_connect: bool = False) -> None:
        self.block = block
        self.stuck_connect = stuck_connect
        self.made: list[FakeSender] = []

    def __call__(self, **kwargs: Any) -> FakeSender:
        self.made.append(FakeSender(self.block, self.stuck_connect, **kwargs))
        return self.made[-1]


def publisher(
    clients: dict[str, SGLangClient], routing: Routing, factory: Factory, **cfg: Any
) -> Publisher:
    config = WeightsConfig(transport="distributed", step_timeout_s=5.0, bucket_mb=1, **cfg)
    transport = DistributedTransport(
        config,
        clients=clients,
        params=params,
        sender_factory=factory,  # type: ignore[arg-type]
    )
    return Publisher(config, fleet=routing, clients=clients, transport=transport)


async def test_one_group_many_publications_version_on_the_last_bucket(
    routing: Routing, sims: dict[str, SimulatedServer], clients: dict[str, SGLangClient]
) -> None:
    factory = Factory()
    pub = publisher(clients, routing, factory)
    for version in (1, 2):
        stats = await pub.publish(version)
        assert stats.bytes == 2 * 2**20 + 6
    (sender,) = factory.made
    assert sender.kwargs == {
        "master_address": "127.0.0.1",
        "master_port": 0,
        "world_size": 3,
        "group_name": "weight_update_group",
        "backend": "gloo",
        "timeout_s": 5.0,
    }
    assert sender.calls == ["connect", "send 3 flattened_bucket", "send 3 flattened_bucket"]
    for sim in sims.values():
        engine = sim.engine
        assert engine.groups == {"weight_update_group": 3}
        versions = [u["version"] for u in engine.stats.weight_updates]
        assert versions == [None, None, "1", None, None, "2"]  # labelled by the last bucket
        assert engine.weight_version == "2"
        assert not engine.session_open  # every session was ended
    await pub.aclose()
    assert sender.calls[-2:] == ["abort", "close"]
    assert all(not sim.engine.groups for sim in sims.values())


async def test_servers_without_sessions_need_none(routing: Routing) -> None:
    sims = make_sims(1, legacy=True)  # SGLang <= 0.5.15: no begin/end routes
    async for clients in open_clients(sims):
        pub = publisher(clients, routing, Factory())
        assert (await pub.publish(1)).version == 1
        assert clients["http://sim0"].has_weight_update_session is False
        await pub.aclose()


async def test_failed_updates_abort_the_blocked_broadcast_at_once(
    routing: Routing, sims: dict[str, SimulatedServer], clients: dict[str, SGLangClient]
) -> None:
    factory = Factory(block=True)  # the broadcast waits for receivers, like gloo
    pub = publisher(clients, routing, factory, retries=1)
    sims["http://sim1"].engine.faults.weight_update_failures = 2  # both attempts
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as failure:
        await pub.publish(1)
    assert time.monotonic() - start < 5  # not the 10 s the fake waits without an abort
    assert len(factory.made) == 2  # the retry opened a new group
    for sender in factory.made:  # the abort may come before the send starts: either order
        assert sender.calls[0] == "connect"
        assert sender.calls[-1] == "close"
        assert sorted(sender.calls[1:3]) == ["abort", "send 3 flattened_bucket"]
    message = str(failure.value)
    assert message.startswith("distributed weights transfer failed after 2 attempts: ")
    assert "transfer on http://sim1: HTTP 400" in message
    assert message.index("http://sim1") < message.index("the trainer")  # server first
    assert all(not sim.engine.groups and not sim.engine.session_open for sim in sims.values())


async def test_recovery_after_one_failed_attempt(
    routing: Routing, sims: dict[str, SimulatedServer], clients: dict[str, SGLangClient]
) -> None:
    factory = Factory()
    pub = publisher(clients, routing, factory, retries=1)
    sims["http://sim0"].engine.faults.weight_update_failures = 1
    assert (await pub.publish(1)).version == 1
    assert len(factory.made) == 2
    assert factory.made[0].calls[-2:] == ["abort", "close"]
    for sim in sims.values():
        assert sim.engine.weight_version == "1"
        assert sim.engine.groups == {"weight_update_group": 3}


async def test_a_group_left_over_on_a_server_is_cleared_by_the_retry(
    routing: Routing, sims: dict[str, SimulatedServer], clients: dict[str, SGLangClient]
) -> None:
    sims["http://sim1"].engine.groups["weight_update_group"] = 3  # from an earlier run
    factory = Factory()
    pub = publisher(clients, routing, factory, retries=1)
    assert (await pub.publish(1)).version == 1  # attempt 1 fails; its cleanup destroys it
    assert len(factory.made) == 2


async def test_a_failed_join_fails_init_by_name_without_waiting_for_the_rendezvous(
    routing: Routing, sims: dict[str, SimulatedServer], clients: dict[str, SGLangClient]
) -> None:
    sims["http://sim1"].engine.groups["weight_update_group"] = 3
    factory = Factory(stuck_connect=True)  # the rendezvous would wait for the failed server
    pub = publisher(clients, routing, factory, retries=0)
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as failure:
        await pub.publish(1)
    assert time.monotonic() - start < 2  # the stuck connect (3 s) was abandoned
    assert str(failure.value).startswith(
        "distributed weights init failed after 1 attempts: init on http://sim1: HTTP 400"
    )
    assert "already exists" in str(failure.value)
    assert routing.events == []  # init runs before the hold: generation never paused


async def test_restore_sends_the_current_weights_to_the_restarted_server_alone(
    routing: Routing, sims: dict[str, SimulatedServer], clients: dict[str, SGLangClient]
) -> None:
    factory = Factory()
    pub = publisher(clients, routing, factory)
    await pub.publish(1)
    restarted = sims["http://sim1"].engine
    restarted.groups.clear()
    restarted.weight_version = "0"
    await pub.on_restart(ServerHandle(1, "http://sim1", max_concurrency=4))
    main, restore = factory.made
    assert main.calls[-2:] == ["abort", "close"]  # the main group is gone everywhere
    assert restore.kwargs["group_name"] == "weight_update_group_restore"
    assert restore.kwargs["world_size"] == 2
    assert restarted.weight_version == "1"
    assert not restarted.groups
    assert not sims["http://sim0"].engine.groups
    assert len(sims["http://sim0"].engine.stats.weight_updates) == 3  # untouched
    await pub.publish(2)  # a new main group
    assert len(factory.made) == 3
    assert all(sim.engine.weight_version == "2" for sim in sims.values())


def test_master_address_is_loopback_for_local_servers() -> None:
    assert reachable_address(["http://127.0.0.1:1", "http://localhost:2"]) == "127.0.0.1"
    remote = reachable_address(["http://127.0.0.1:1", "http://10.255.255.1:30000"])
    assert remote != "127.0.0.1"


async def test_cancellation_mid_broadcast_aborts_the_sender(
    routing: Routing, clients: dict[str, SGLangClient]
) -> None:
    factory = Factory(block=True)
    pub = publisher(clients, routing, factory)
    with anyio.move_on_after(0.5):
        await pub.publish(1)
    assert "abort" in factory.made[0].calls
    assert routing.events[-1] == "resume"
    await pub.aclose()


async def test_a_down_server_is_left_out_of_the_group_until_its_restart(
    routing: Routing, sims: dict[str, SimulatedServer], clients: dict[str, SGLangClient]
) -> None:
    factory = Factory()
    pub = publisher(clients, routing, factory, retries=0)
    down = routing.handle("http://sim1")
    down.available = False
    await pub.publish(1)
    assert factory.made[0].kwargs["world_size"] == 2  # the trainer and sim0
    assert not sims["http://sim1"].engine.stats.weight_updates
    await pub.on_restart(down)  # restore group of two, then the fleet routes it again
    down.available = True
    assert sims["http://sim1"].engine.weight_version == "1"
    await pub.publish(2)
    assert [s.kwargs["world_size"] for s in factory.made] == [2, 2, 3]
    assert all(sim.engine.weight_version == "2" for sim in sims.values())


async def test_a_server_dying_mid_broadcast_is_dropped_and_the_rest_retried_at_once(
    routing: Routing, sims: dict[str, SimulatedServer], clients: dict[str, SGLangClient]
) -> None:
    factory = Factory()
    pub = publisher(clients, routing, factory, retries=0)  # no retry budget needed
    victim = clients["http://sim1"]

    async def dies(*args: Any, **kwargs: Any) -> Any:
        routing.handle("http://sim1").available = False  # the supervisor saw the exit
        raise EngineUnavailable("http://sim1: ConnectError")

    victim.update_weights_from_distributed = dies  # type: ignore[method-assign]
    with anyio.fail_after(5):
        assert (await pub.publish(1)).version == 1
    assert [s.kwargs["world_size"] for s in factory.made] == [3, 2]
    assert sims["http://sim0"].engine.weight_version == "1"
    assert routing.events[-1] == "resume"
