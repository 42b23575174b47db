"""A launched local server SIGKILLed during a publication (docs/architecture.md §4, crashes).

Two local servers are launched by a real fleet (``open_fleet``, backend ``local``) with the
publisher as its restart hook. The publication kills one server as its transfer starts: it must
complete on the other, with no exception escaping; the fleet relaunches the killed server and
routes it again only after ``Publisher.on_restart`` loaded and verified the current weights;
the next publication reaches both.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch

from nexrl_async.config.inference import LocalInference, WeightsConfig
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.inference.fleet.supervisor import Fleet, open_fleet
from nexrl_async.train.trainer import Trainer
from nexrl_async.weights import (
    DiskTransport,
    DistributedTransport,
    Publisher,
    SharedTransport,
    Transport,
    staging_of,
)
from nexrl_async.weights.sender import WeightSender
from nexrl_async.weights.steps import Targets

from .conftest import API_KEY
from .test_distributed_publish import make_trainer, nudge, server_sample, trainer_logprobs

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]


class KillAtTransfer:
    """Delegates to ``inner``; SIGKILLs ``victim`` as the first transfer starts."""

    def __init__(self, inner: Transport, victim: ServerHandle) -> None:
        self.inner = inner
        self.victim = victim
        self.name = inner.name
        self.atomic = inner.atomic
        self.killed_pid: int | None = None

    def capture(self, version: int) -> bool:
        return self.inner.capture(version)

    async def prepare(self, version: int, targets: Targets) -> None:
        await self.inner.prepare(version, targets)

    async def transfer(self, version: int, targets: Targets) -> int:
        if self.killed_pid is None:
            assert self.victim.pid is not None
            self.killed_pid = self.victim.pid
            os.kill(self.victim.pid, signal.SIGKILL)
        return await self.inner.transfer(version, targets)

    def committed(self, version: int) -> None:
        self.inner.committed(version)

    async def restore(self, server: ServerHandle, version: int) -> None:
        await self.inner.restore(server, version)

    async def aclose(self) -> None:
        await self.inner.aclose()


def make_transport(
    kind: str, cfg: WeightsConfig, trainer: Trainer, clients: dict[str, SGLangClient], run: Path
) -> Transport:
    if kind == "disk":
        return DiskTransport(
            cfg, clients=clients, weights_dir=run / "weights", export=trainer.save_hf
        )
    if kind == "shared":
        stage, close = staging_of(trainer.named_parameters_for_sync)
        return SharedTransport(cfg, clients=clients, stage=stage, close=close)
    return DistributedTransport(
        cfg, clients=clients, params=trainer.named_parameters_for_sync, sender_factory=WeightSender
    )


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``condition`` (fleet state has no event to wait on) until true, or fail."""
    with anyio.fail_after(timeout_s):
        while True:
            if condition():
                return
            await anyio.sleep(0.1)


async def assert_serves(http: httpx.AsyncClient, url: str, trainer: Trainer, version: int) -> None:
    ids, lps, served_by = await server_sample(http, url)
    assert served_by == str(version)
    assert torch.allclose(lps, trainer_logprobs(trainer, ids), atol=1e-4, rtol=0), url


@pytest.mark.parametrize(
    ("kind", "inflight"), [("distributed", "in_place"), ("disk", "drain"), ("shared", "in_place")]
)
async def test_a_server_killed_mid_publication_is_restored_after_its_restart(
    model_dir: Path, tmp_path: Path, kind: str, inflight: Any
) -> None:
    inference = LocalInference(
        servers=2, api_key=API_KEY, extra_args=["--torch-threads", "1"], health_interval_s=0.5,
        health_timeout_s=120.0, restart_backoff_s=0.2, max_restarts=1, retries=0,
    )  # fmt: skip
    cfg = WeightsConfig(transport=kind, inflight=inflight, step_timeout_s=30.0, retries=0)
    trainer = make_trainer()
    hook: dict[str, Publisher] = {}

    async def on_restart(server: ServerHandle) -> None:
        await hook["publisher"].on_restart(server)

    with anyio.fail_after(240):
        async with (
            httpx.AsyncClient(timeout=None) as http,
            open_fleet(
                inference, model_dir=model_dir, log_dir=tmp_path / "logs", http=http,
                on_restart=on_restart,
            ) as fleet,
        ):  # fmt: skip
            await crash_and_recover(fleet, http, trainer, cfg, kind, tmp_path, hook)


async def crash_and_recover(
    fleet: Fleet,
    http: httpx.AsyncClient,
    trainer: Trainer,
    cfg: WeightsConfig,
    kind: str,
    run: Path,
    hook: dict[str, Publisher],
) -> None:
    clients = {u: SGLangClient(u, http=http, api_key=API_KEY, retries=0) for u in fleet.urls}
    survivor, victim = fleet.servers
    transport = KillAtTransfer(make_transport(kind, cfg, trainer, clients, run), victim)
    publisher = Publisher(cfg, fleet=fleet, clients=clients, transport=transport)
    hook["publisher"] = publisher
    try:
        nudge(trainer, seed=1)
        stats = await publisher.publish(1)  # the victim dies as the transfer starts
        assert (stats.version, stats.skipped) == (1, 1)
        assert survivor.weight_version == "1"
        await assert_serves(http, survivor.url, trainer, 1)
        await wait_until(lambda: victim.restarts == 1 and victim.available, 200)
        assert victim.pid not in (None, transport.killed_pid)
        assert victim.weight_version == "1"  # verified by on_restart before it was routed
        await assert_serves(http, victim.url, trainer, 1)
        nudge(trainer, seed=2)
        assert (await publisher.publish(2)).skipped == 0
        for server in fleet.servers:
            await assert_serves(http, server.url, trainer, 2)
    finally:
        await publisher.aclose()
