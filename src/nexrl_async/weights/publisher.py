"""Weight publication: new trainer weights into every inference server (docs/architecture.md §4).

One publication of version ``v`` is a state machine; every step runs under
``weights.step_timeout_s`` and per-server steps are retried (``weights.steps``)::

    prepare  transport work that needs no pause (disk: export HF safetensors; distributed:
             make sure the broadcast group exists)                       rollouts go on
    hold     drain: stop routing new requests, wait for running ones to finish
             interrupt: stop routing, pause_generation(abort) (partials come back to workers);
             a request that reaches its server after the pause waits at the server's gate
             until continue, so leases still running INTERRUPT_GRACE_S after the pause are
             cut client-side (nothing of them came back; the generator sends them again once
             routing resumes, on the new weights)
             in_place: stop routing, pause_generation(in_place) (running requests frozen
             between two decode steps, nothing waited for)
             (pauses go only to servers with requests of this engine running: routing is
             held, so an idle server stays idle, and pausing it would cost two calls)
    transfer the transport moves the weights into every server, labelled ``v``
    verify   every server reports weight_version == v
    flush    every server's prefix cache flushed (not in_place: requests still hold KV)
    continue the paused servers: continue_generation; routing resumes (always, in a finally)

The transport is the seam (:class:`Transport`): :class:`~nexrl_async.weights.disk.DiskTransport`
(``/update_weights_from_disk``),
:class:`~nexrl_async.weights.distributed.DistributedTransport` (``/update_weights_from_distributed``
with the trainer's broadcast) or :class:`~nexrl_async.weights.shared.SharedTransport` (local
servers copy a shared-memory file; its swap is atomic and labelled, so ``in_place`` skips the
hold, the verify and the continue: a publication is the transfer alone).

Crashes: a publication addresses the servers the fleet routes (``ServerHandle.available``). A
server that is down, or goes down during a step, is dropped from the publication, which
completes on the others; when its restart completes the fleet calls :meth:`Publisher.on_restart`
before routing it again, which loads the current weights and verifies the version under the
same lock, so it never overlaps a publication (a failure there is the server's: the fleet
restarts it again, and fails the run once its restart budget is spent). A server still routed
that does not answer is retried for at least ``weights.retry_window_s`` (default the fleet's
health timeout). Any other failure after the retry budget raises :class:`WeightSyncError`
naming the server and the step: the run fails loudly rather than training against stale servers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import anyio
from loguru import logger
from msgspec import Struct

from nexrl_async.config.inference import InferenceConfig, WeightsConfig
from nexrl_async.core.errors import WeightSyncError
from nexrl_async.inference.client.control import ServerControl
from nexrl_async.inference.client.structs import PauseMode
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.weights.disk import DiskTransport, Exporter
from nexrl_async.weights.steps import Targets, best_effort, each_server, run_step

CLEANUP_S = 10.0
"""Bound of best-effort cleanup calls after a failed publication."""

INTERRUPT_GRACE_S = 2.0
"""How long an ``interrupt`` hold waits after ``pause_generation(abort)`` for the aborted
partials to come back before it cuts the leases still running on the paused servers: their
requests reached the server after the pause and wait at its gate until continue."""


class PublishStats(Struct, frozen=True, kw_only=True):
    """What one publication cost."""

    version: int
    bytes: int
    """Weight bytes moved (the payload once, whatever the number of servers)."""
    export_s: float
    """Transport preparation before the hold (disk export, group set-up)."""
    pause_s: float
    """Routing held: hold, transfer, verify, flush, continue (0 when nothing is held: an atomic
    transport in place)."""
    transfer_s: float
    total_s: float
    hold_s: float = 0.0
    """The hold alone (part of ``pause_s``): a drain waits here for running requests."""
    skipped: int = 0
    """Servers left out because the fleet marked them down (loaded on restart)."""


class Transport(Protocol):
    """How weights travel to the servers; the :class:`Publisher` owns the state machine."""

    name: str
    atomic: bool
    """Each server swaps and labels a whole version between two of its decode steps by itself
    (shared memory): ``in_place`` then needs no hold (no routing pause, no pause/continue
    calls) and no separate verify (a successful transfer is the label)."""

    def capture(self, version: int) -> bool:
        """Fix, now, the weights a later :meth:`transfer` of ``version`` sends, in a form no
        training step changes before the step after next; False when the transport cannot
        (its transfer reads the trainer's parameters then)."""

    async def prepare(self, version: int, targets: Targets) -> None:
        """Work that needs no pause (runs before the hold, outside the lock)."""

    async def transfer(self, version: int, targets: Targets) -> int:
        """Load the trainer's weights into every live server of ``targets`` as ``version``
        (servers held); returns the payload bytes. A server that goes down is dropped from
        ``targets``; raises :class:`WeightSyncError` after its retry budget."""

    def committed(self, version: int) -> None:
        """Every live server verified ``version`` (disk: forget old folders)."""

    async def restore(self, server: ServerHandle, version: int) -> None:
        """Bring a relaunched ``server`` to ``version`` (0: the initial weights)."""

    async def aclose(self) -> None:
        """Release what the transport holds (groups, stores); bounded."""


class Routing(Protocol):
    """What the publisher needs of the fleet (``inference.fleet.Fleet``)."""

    @property
    def cfg(self) -> InferenceConfig:
        """Its ``health_timeout_s`` is the default retry window (``weights.retry_window_s``)."""

    @property
    def servers(self) -> Sequence[ServerHandle]:
        """Which servers are up (``available``); a down one is skipped."""

    def pause_routing(self) -> None: ...

    def resume_routing(self) -> None: ...

    async def wait_drained(self) -> None: ...

    def cut_running(self, server: ServerHandle, reason: str) -> int: ...


Inflight = Literal["drain", "interrupt", "in_place"]


class Versions(Protocol):
    """The owner of the served policy version (in the engine: the staleness gate, through the
    flow). The publisher reads it and advances it once a version is verified everywhere."""

    @property
    def version(self) -> int: ...

    async def advance(self, version: int) -> None: ...


class OwnVersion:
    """A :class:`Versions` of the publisher's own, for use without an engine (tests, tools)."""

    def __init__(self) -> None:
        self.version = 0

    async def advance(self, version: int) -> None:
        self.version = version


class Publisher:
    """Publishes trainer weights to the fleet through ``transport``."""

    def __init__(
        self,
        cfg: WeightsConfig,
        *,
        fleet: Routing,
        clients: Mapping[str, ServerControl],
        transport: Transport,
        versions: Versions | None = None,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.clients = clients
        self.transport = transport
        self.versions = versions or OwnVersion()
        self.inflight: Inflight = "drain" if cfg.inflight == "auto" else cfg.inflight
        """``weights.inflight`` (``auto`` left unresolved: ``drain``, right for any server)."""
        self.window_s = cfg.retry_window_s or fleet.cfg.health_timeout_s
        self.interrupt_grace_s = INTERRUPT_GRACE_S
        """See :data:`INTERRUPT_GRACE_S`."""
        self._handles = {server.url: server for server in fleet.servers}
        self._lock = anyio.Lock()

    @property
    def version(self) -> int:
        """The version every live server serves (owned by :attr:`versions`)."""
        return self.versions.version

    def is_up(self, url: str) -> bool:
        """Whether the fleet routes ``url`` now (a server it does not know counts as up)."""
        handle = self._handles.get(url)
        return handle is None or handle.available

    async def publish(self, version: int) -> PublishStats:
        """Run the whole state machine for ``version``; return its costs.

        Once every live server verified ``version`` it is advanced in :attr:`versions` (under
        the publisher's lock, so a restarted server never loads an older one). Without servers
        (``inference.backend = "none"``) the version only advances. Servers that are down, or
        go down meanwhile, are skipped: :meth:`on_restart` loads them.
        """
        if not self.clients:
            await self.versions.advance(version)
            return PublishStats(
                version=version, bytes=0, export_s=0.0, pause_s=0.0, transfer_s=0.0, total_s=0.0
            )
        start = time.perf_counter()
        targets = Targets(
            self.clients, self.is_up, window_s=self.window_s, in_place=self.inflight == "in_place"
        )
        await self.transport.prepare(version, targets)
        export_s = time.perf_counter() - start
        async with self._lock:
            pause_start = time.perf_counter()
            nbytes, hold_s, transfer_s = await self._held(version, targets)
            pause_s = time.perf_counter() - pause_start if self._holds else 0.0
            await self.versions.advance(version)
            self.transport.committed(version)
            for url in targets.live():
                if url in self._handles:
                    self._handles[url].weight_version = str(version)
        stats = PublishStats(
            version=version,
            bytes=nbytes,
            export_s=export_s,
            pause_s=pause_s,
            transfer_s=transfer_s,
            total_s=time.perf_counter() - start,
            hold_s=hold_s,
            skipped=len(targets.dropped),
        )
        _log(stats, self.transport.name, self.inflight, targets)
        return stats

    def capture(self, version: int) -> bool:
        """Fix the weights :meth:`publish` of ``version`` will send, before the trainer's next
        step; True when that publication may run beside the next step (an atomic transport in
        place that captured them: nothing is held, nothing reads the live parameters)."""
        return bool(self.clients) and not self._holds and self.transport.capture(version)

    async def on_restart(self, server: ServerHandle) -> None:
        """Fleet restart hook: load the current weights into a relaunched server and verify
        them before it is routed again. A failure here is the server's (the fleet restarts
        it again, within its budget), never the run's."""
        async with self._lock:
            logger.info("bringing restarted {} to weights v{}", server.url, self.version)
            await self.transport.restore(server, self.version)
            if self.version > 0:
                client = self.clients[server.url]
                deadline = self.cfg.step_timeout_s
                await run_step(
                    self.cfg, "restore", server.url, lambda: _verify(client, self.version, deadline)
                )
                server.weight_version = str(self.version)

    async def aclose(self) -> None:
        """Release the transport's resources (bounded; safe to call more than once)."""
        with anyio.CancelScope(shield=True):
            await self.transport.aclose()

    async def _held(self, version: int, targets: Targets) -> tuple[int, float, float]:
        """hold → transfer → verify → flush → continue; routing resumes whatever happens.
        Returns the bytes, the hold's and the transfer's seconds."""
        if not self._holds:
            return await self._unheld(version, targets)
        hold_start = time.perf_counter()
        self.fleet.pause_routing()
        paused = targets.subset(self._busy(targets)) if self.inflight != "drain" else None
        resumed = False
        try:
            await self._hold(targets, paused)
            transfer_start = time.perf_counter()
            hold_s = transfer_start - hold_start
            nbytes = await self.transport.transfer(version, targets)
            transfer_s = time.perf_counter() - transfer_start
            deadline = self.cfg.step_timeout_s
            await self._each(targets, "verify", lambda c: _verify(c, version, deadline))
            if self.inflight != "in_place":  # in place: requests (and their KV) stay
                await self._each(targets, "flush", lambda c: _flush(c, deadline))
            if paused is not None:
                await self._each(
                    paused, "continue", lambda c: c.continue_generation(timeout_s=deadline)
                )
            resumed = True
        finally:
            if not resumed and paused is not None:
                await best_effort(
                    paused.live(),
                    "continue",
                    lambda c: c.continue_generation(timeout_s=CLEANUP_S),
                    timeout_s=CLEANUP_S,
                )
            self.fleet.resume_routing()
        return nbytes, hold_s, transfer_s

    @property
    def _holds(self) -> bool:
        """Whether publications hold routing (all but an atomic transport in place)."""
        return not (self.inflight == "in_place" and self.transport.atomic)

    async def _unheld(self, version: int, targets: Targets) -> tuple[int, float, float]:
        """An atomic transport in place: the transfer alone, with routing and requests going on
        (a request routed meanwhile runs on whichever weights its server holds per step). Its
        transfer is its verification: a server answers success only once it serves the whole
        of ``version``, labelled so in the same step of its loop."""
        start = time.perf_counter()
        nbytes = await self.transport.transfer(version, targets)
        return nbytes, 0.0, time.perf_counter() - start

    async def _each(
        self, targets: Targets, step: str, call: Callable[[ServerControl], Awaitable[object]]
    ) -> None:
        await each_server(self.cfg, targets, step, call)

    def _busy(self, targets: Targets) -> list[str]:
        """Servers with requests of this engine running (a server the fleet does not know
        counts as busy). Routing is held, so an idle server stays idle until it resumes."""
        handles = self._handles
        return [u for u in targets.live() if u not in handles or handles[u].active > 0]

    async def _hold(self, targets: Targets, paused: Targets | None) -> None:
        """``drain`` waits for running requests; ``interrupt`` aborts them first; ``in_place``
        freezes them between two decode steps and waits for nothing. Only ``paused`` (the busy
        servers) are paused: pausing an idle server changes nothing and costs two calls.

        A request that reaches a server after its ``pause(abort)`` (leased before the hold,
        still on its way) is not aborted: it waits at the server's gate until continue, and its
        lease would never drain. So the ``interrupt`` hold waits :attr:`interrupt_grace_s` for
        the aborted partials to come back, then cuts the leases still running on the paused
        servers (``cut_running``): nothing of them came back, and the generator sends them again
        once routing resumes, on the new weights."""
        deadline = self.cfg.step_timeout_s
        if paused is not None:
            mode: PauseMode = "in_place" if self.inflight == "in_place" else "abort"
            await self._each(
                paused, "pause", lambda c: c.pause_generation(mode, timeout_s=deadline)
            )
        if self.inflight == "in_place":
            return
        with anyio.fail_after(deadline):
            if paused is not None:  # interrupt (drain pauses nothing)
                await self._cut_after_grace(paused)
            await self.fleet.wait_drained()

    async def _cut_after_grace(self, paused: Targets) -> None:
        """Wait :attr:`interrupt_grace_s` for the aborted partials; then cut the leases still
        running on the paused servers (held at their gates, see :meth:`_hold`)."""
        with anyio.move_on_after(self.interrupt_grace_s):
            await self.fleet.wait_drained()
            return
        for url in paused.live():
            if url in self._handles:
                self.fleet.cut_running(self._handles[url], "held at a paused gate")


def _log(stats: PublishStats, transport: str, inflight: str, targets: Targets) -> None:
    skipped = f"; skipped {', '.join(sorted(targets.dropped))} (down)" if targets.dropped else ""
    logger.info(
        "published v{} by {}: {:.2f} MB in {:.1f} ms; paused {:.1f} ms ({} hold {:.1f} ms), "
        "total {:.1f} ms{}",
        stats.version, transport, stats.bytes / 1e6, 1e3 * stats.transfer_s,
        1e3 * stats.pause_s, inflight, 1e3 * stats.hold_s, 1e3 * stats.total_s, skipped,
    )  # fmt: skip


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
