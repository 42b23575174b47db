"""The distributed transport: the trainer broadcasts, every server receives (no disk).

``weights.transport = "distributed"``. The broadcast group (``weights.group``) is opened over
the servers the fleet routes, in the first publication's ``prepare`` (outside the hold), and
reused while they stay the same; each ``transfer`` plans buckets of at most ``weights.bucket_mb``
MiB from the trainer's parameters and broadcasts them while every member receives
(docs/sglang_api.md §4.1). A group whose members are no longer the live servers is closed and a
new one opened over them.

Failures: a failed attempt closes the group (the sender is aborted, every server leaves it).
When a member went down meanwhile, the attempt is made again at once without it (it gets the
weights on restart); otherwise after a backoff, up to ``weights.retries`` retries and, while a
server does not answer, for the publication's retry window; then :class:`WeightSyncError` names
the server (or the trainer) and the step. A relaunched server
(:meth:`DistributedTransport.restore`) breaks the group too: it is closed and re-opened by the
next publication, and the relaunched server alone gets the current weights through a temporary
two-party group before it is routed again.

The trainer's parameters are read (planned and sent) while holding ``limiter`` (the engine's
torch limiter), so no training step changes them mid-broadcast. Between a step and its
publication they are one version ahead: a restore in that window labels them with the
published version, and the publication that follows replaces them anyway.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Generic, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from loguru import logger
from torch import Tensor

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import WeightSyncError
from nexrl_async.inference.client.control import ServerControl
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.weights.group import (
    Backend,
    BroadcastGroup,
    BucketT,
    LoadFormat,
    SenderFactory,
)
from nexrl_async.weights.steps import Attempts, Targets, sleep_unless_down

T = TypeVar("T")

ParamSource = Callable[[], Iterable[tuple[str, Tensor]]]
"""``(HF name, full tensor)`` of every parameter (``Trainer.named_parameters_for_sync``)."""


class DistributedTransport(Generic[BucketT]):
    """``weights.transport = "distributed"`` (see the module docstring)."""

    name = "distributed"
    atomic = False

    def capture(self, version: int) -> bool:
        return False

    def __init__(
        self,
        cfg: WeightsConfig,
        *,
        clients: Mapping[str, ServerControl],
        params: ParamSource,
        sender_factory: SenderFactory[BucketT],
        backend: Backend = "gloo",
        load_format: LoadFormat = "flattened_bucket",
        master_address: str | None = None,
        group_name: str = "weight_update_group",
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        """``master_address``: where the servers reach the trainer (default: loopback when every
        server is local, else this host's address on the route to the first server)."""
        self.cfg = cfg
        self.clients = clients
        self.params = params
        self.limiter = limiter or anyio.CapacityLimiter(1)
        self.group_name = group_name
        self._make_group: Callable[[str, Mapping[str, ServerControl]], BroadcastGroup[BucketT]]
        address = master_address or reachable_address(list(clients))
        self._make_group = lambda name, subset: BroadcastGroup(
            cfg,
            name=name,
            clients=subset,
            factory=sender_factory,
            master_address=address,
            backend=backend,
            load_format=load_format,
        )
        self._group: BroadcastGroup[BucketT] | None = None
        self._lock = anyio.Lock()
        """Group changes: ``prepare`` runs outside the publisher's lock."""

    async def prepare(self, version: int, targets: Targets) -> None:
        """Open the group if there is none (the servers keep generating meanwhile)."""
        if self._group is None:
            await self._attempts("init", targets, self._group_for)

    async def transfer(self, version: int, targets: Targets) -> int:
        async def once(live: Mapping[str, ServerControl]) -> int:
            return await self._send(await self._group_for(live), version)

        return await self._attempts("transfer", targets, once) or 0

    def committed(self, version: int) -> None:
        return None

    async def restore(self, server: ServerHandle, version: int) -> None:
        """The relaunched server left the group: close it (re-opened by the next publication)
        and, past version 0, send the current weights to that server alone."""
        async with self._lock:
            await self._close()
        if version == 0:
            return
        client = {server.url: self.clients[server.url]}
        group = self._make_group(f"{self.group_name}_restore", client)
        try:
            await group.open()
            await self._send(group, version)
        finally:
            await group.close()
        logger.info("restored weights v{} into {}", version, server.url)

    async def aclose(self) -> None:
        async with self._lock:
            await self._close()

    async def _group_for(self, live: Mapping[str, ServerControl]) -> BroadcastGroup[BucketT]:
        """The open group if its members are ``live``, else a new group over them."""
        if (group := self._fitting(live)) is not None:
            return group  # no lock: every loop cycle counts on a busy event loop
        async with self._lock:
            if (group := self._fitting(live)) is not None:
                return group
            await self._close()
            group = self._make_group(self.group_name, dict(live))
            self._group = group  # closed (every server leaves it) if the open fails
            await group.open()
            return group

    def _fitting(self, live: Mapping[str, ServerControl]) -> BroadcastGroup[BucketT] | None:
        """The open group when its members are exactly ``live``."""
        group = self._group
        if group is None or group.sender is None or group.clients.keys() != live.keys():
            return None
        return group

    async def _send(self, group: BroadcastGroup[BucketT], version: int) -> int:
        sender = group.sender
        if sender is None:
            raise WeightSyncError(f"weight-update group {group.name} is not open")

        async def plan() -> list[BucketT]:
            return await anyio.to_thread.run_sync(
                lambda: sender.plan(self.params(), bucket_mb=self.cfg.bucket_mb)
            )

        async with self.limiter:  # no training step between planning and sending
            return await group.send(plan, version)

    async def _close(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            await group.close()

    async def _attempts(
        self,
        step: str,
        targets: Targets,
        attempt: Callable[[Mapping[str, ServerControl]], Awaitable[T]],
    ) -> T | None:
        """``attempt(live servers)`` until it succeeds (None: no server is up). A failure closes
        the group; one where a member went down is retried at once without it, others after a
        backoff within ``weights.retries`` and, for unanswered servers, the targets' window."""
        attempts = Attempts(self.cfg.retries, targets.window_s)
        while live := targets.live():
            try:
                return await attempt(live)
            except WeightSyncError as err:
                async with self._lock:
                    await self._close()
                if any(not targets.up(url) for url in live):
                    continue
                logger.warning(
                    "distributed weights {} failed (attempt {}): {}", step, attempts.made + 1, err
                )
                if not attempts.again(err):
                    raise WeightSyncError(
                        f"distributed weights {step} failed after {attempts.made} attempts: {err}"
                    ) from err
            await sleep_unless_down(attempts.backoff_s(), targets, list(live))
        return None


def reachable_address(urls: list[str]) -> str:
    """Loopback when every server URL is local, else the local address routed to the first."""
    hosts = [urlsplit(url).hostname or "127.0.0.1" for url in urls]
    if all(_is_loopback(host) for host in hosts):
        return "127.0.0.1"
    remote = next(h for h in hosts if not _is_loopback(h))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((remote, 9))  # UDP: no packet is sent, the kernel only picks a route
        return str(probe.getsockname()[0])
    return socket.gethostbyname(socket.gethostname())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
