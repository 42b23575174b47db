"""Weight publication: new trainer weights into every inference server (docs/architecture.md §4).

One publication of version ``v`` is a state machine; every step runs under
``weights.step_timeout_s`` and per-server steps are retried ``weights.retries`` times::

    prepare  transport work that needs no pause (disk: export HF safetensors; distributed:
             make sure the broadcast group exists)                       rollouts go on
    hold     drain: stop routing new requests, wait for running ones to finish
             interrupt: stop routing, pause_generation(abort) (partials come back to workers)
    transfer the transport moves the weights into every server, labelled ``v``
    verify   every server reports weight_version == v
    flush    every server's prefix cache flushed
    continue interrupt: continue_generation; routing resumes (always, in a finally)

The transport is the seam (:class:`Transport`): :class:`~nexrl_async.weights.disk.DiskTransport`
(``/update_weights_from_disk``) or
:class:`~nexrl_async.weights.distributed.DistributedTransport` (``/update_weights_from_distributed``
with the trainer's broadcast). A relaunched server is brought to the current version by
:meth:`Publisher.on_restart` (the fleet's restart hook) under the same lock, so it never overlaps
a publication. A failure after the retry budget raises :class:`WeightSyncError` naming the server
and the step: the run fails loudly rather than training against stale servers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

import anyio
from loguru import logger
from msgspec import Struct

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import WeightSyncError
from nexrl_async.inference.client.control import ServerControl
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.weights.disk import DiskTransport, Exporter
from nexrl_async.weights.steps import best_effort, each_server

CLEANUP_S = 10.0
"""Bound of best-effort cleanup calls after a failed publication."""


class PublishStats(Struct, frozen=True, kw_only=True):
    """What one publication cost."""

    version: int
    bytes: int
    """Weight bytes moved (the payload once, whatever the number of servers)."""
    export_s: float
    """Transport preparation before the hold (disk export, group set-up)."""
    pause_s: float
    """Routing held: hold, transfer, verify, flush, continue."""
    transfer_s: float
    total_s: float


class Transport(Protocol):
    """How weights travel to the servers; the :class:`Publisher` owns the state machine."""

    name: str

    async def prepare(self, version: int) -> None:
        """Work that needs no pause (runs before the hold, outside the lock)."""

    async def transfer(self, version: int) -> int:
        """Load the trainer's weights into every server as ``version`` (servers held);
        returns the payload bytes. Raises :class:`WeightSyncError` after its retry budget."""

    def committed(self, version: int) -> None:
        """Every server verified ``version`` (disk: forget old folders)."""

    async def restore(self, server: ServerHandle, version: int) -> None:
        """Bring a relaunched ``server`` to ``version`` (0: the initial weights)."""

    async def aclose(self) -> None:
        """Release what the transport holds (groups, stores); bounded."""


class Routing(Protocol):
    """What the publisher needs of the fleet (``inference.fleet.Fleet``)."""

    def pause_routing(self) -> None: ...

    def resume_routing(self) -> None: ...

    async def wait_drained(self) -> None: ...


class Publisher:
    """Publishes trainer weights to the fleet through ``transport``."""

    def __init__(
        self,
        cfg: WeightsConfig,
        *,
        fleet: Routing,
        clients: Mapping[str, ServerControl],
        transport: Transport,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.clients = clients
        self.transport = transport
        self.version = 0
        self._lock = anyio.Lock()

    async def publish(self, version: int) -> PublishStats:
        """Run the whole state machine for ``version``; return its costs.

        Without servers (``inference.backend = "none"``) the version only advances.
        """
        if not self.clients:
            self.version = version
            return PublishStats(
                version=version, bytes=0, export_s=0.0, pause_s=0.0, transfer_s=0.0, total_s=0.0
            )
        start = time.perf_counter()
        await self.transport.prepare(version)
        export_s = time.perf_counter() - start
        async with self._lock:
            pause_start = time.perf_counter()
            resumed = False
            try:
                await self._hold()
                transfer_start = time.perf_counter()
                nbytes = await self.transport.transfer(version)
                transfer_s = time.perf_counter() - transfer_start
                deadline = self.cfg.step_timeout_s
                await self._each("verify", lambda c: _verify(c, version, deadline))
                await self._each("flush", lambda c: _flush(c, deadline))
                if self.cfg.inflight == "interrupt":
                    await self._each(
                        "continue", lambda c: c.continue_generation(timeout_s=deadline)
                    )
                resumed = True
            finally:
                if not resumed and self.cfg.inflight == "interrupt":
                    await best_effort(
                        self.clients,
                        "continue",
                        lambda c: c.continue_generation(timeout_s=CLEANUP_S),
                        timeout_s=CLEANUP_S,
                    )
                self.fleet.resume_routing()
            pause_s = time.perf_counter() - pause_start
            self.version = version
            self.transport.committed(version)
        logger.info(
            "published v{} by {}: {:.1f} MB in {:.2f} s (paused {:.2f} s)",
            version,
            self.transport.name,
            nbytes / 1e6,
            transfer_s,
            pause_s,
        )
        return PublishStats(
            version=version,
            bytes=nbytes,
            export_s=export_s,
            pause_s=pause_s,
            transfer_s=transfer_s,
            total_s=time.perf_counter() - start,
        )

    async def on_restart(self, server: ServerHandle) -> None:
        """Fleet restart hook: load the current weights into a relaunched server."""
        async with self._lock:
            logger.info("bringing restarted {} to weights v{}", server.url, self.version)
            await self.transport.restore(server, self.version)

    async def aclose(self) -> None:
        """Release the transport's resources (bounded; safe to call more than once)."""
        with anyio.CancelScope(shield=True):
            await self.transport.aclose()

    async def _each(self, step: str, call: Callable[[ServerControl], Awaitable[object]]) -> None:
        await each_server(self.cfg, self.clients, step, call)

    async def _hold(self) -> None:
        self.fleet.pause_routing()
        if self.cfg.inflight == "interrupt":
            deadline = self.cfg.step_timeout_s
            await self._each("pause", lambda c: c.pause_generation("abort", timeout_s=deadline))
        with anyio.fail_after(self.cfg.step_timeout_s):
            await self.fleet.wait_drained()


async def _verify(client: ServerControl, version: int, timeout_s: float) -> None:
    info = await client.model_info(timeout_s=timeout_s)
    if info.weight_version_int != version:
        raise WeightSyncError(
            f"{client.base_url} reports weight_version {info.weight_version!r} after "
            f"loading v{version}"
        )


async def _flush(client: ServerControl, timeout_s: float) -> None:
    await client.flush_cache(timeout_s=timeout_s)


class WeightPublisher(Publisher):
    """The disk publisher with its original constructor (``weights.transport = "disk"``)."""

    def __init__(
        self,
        cfg: WeightsConfig,
        *,
        fleet: Routing,
        clients: Mapping[str, ServerControl],
        weights_dir: Path,
        export: Exporter,
        initial_path: Path | None = None,
    ) -> None:
        transport = DiskTransport(
            cfg, clients=clients, weights_dir=weights_dir, export=export, initial_path=initial_path
        )
        super().__init__(cfg, fleet=fleet, clients=clients, transport=transport)
