"""The distributed transport: the trainer broadcasts, every server receives (no disk).

``weights.transport = "distributed"``. The broadcast group (``weights.group``) is opened once, in
the first publication's ``prepare`` (outside the hold), and reused by every publication; each
``transfer`` plans buckets of at most ``weights.bucket_mb`` MiB from the trainer's parameters and
broadcasts them while every server receives (docs/sglang_api.md §4.1).

Failures: a failed attempt closes the group (the sender is aborted, every server leaves it) and
the next attempt opens a new one, up to ``weights.retries`` retries; then
:class:`WeightSyncError` names the server (or the trainer) and the step. A relaunched server
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
from nexrl_async.weights.steps import backoff_s

T = TypeVar("T")

ParamSource = Callable[[], Iterable[tuple[str, Tensor]]]
"""``(HF name, full tensor)`` of every parameter (``Trainer.named_parameters_for_sync``)."""


class DistributedTransport(Generic[BucketT]):
    """``weights.transport = "distributed"`` (see the module docstring)."""

    name = "distributed"

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

    async def prepare(self, version: int) -> None:
        """Open the group if there is none (the servers keep generating meanwhile)."""
        if self._group is None:
            await self._attempts("init", self._open)

    async def transfer(self, version: int) -> int:
        async def once() -> int:
            group = self._group or await self._open()
            return await self._send(group, version)

        return await self._attempts("transfer", once)

    def committed(self, version: int) -> None:
        return None

    async def restore(self, server: ServerHandle, version: int) -> None:
        """The relaunched server left the group: close it (re-opened by the next publication)
        and, past version 0, send the current weights to that server alone."""
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
        await self._close()

    async def _open(self) -> BroadcastGroup[BucketT]:
        await self._close()
        group = self._make_group(self.group_name, self.clients)
        self._group = group  # closed (every server leaves it) if the open fails
        await group.open()
        return group

    async def _send(self, group: BroadcastGroup[BucketT], version: int) -> int:
        sender = group.sender
        if sender is None:
            raise WeightSyncError(f"weight-update group {group.name} is not open")
        async with self.limiter:  # no training step between planning and sending
            buckets = await anyio.to_thread.run_sync(
                lambda: sender.plan(self.params(), bucket_mb=self.cfg.bucket_mb)
            )
            return await group.send(buckets, version)

    async def _close(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            await group.close()

    async def _attempts(self, step: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` with ``weights.retries`` retries; a failure closes the group first."""
        last: WeightSyncError | None = None
        for n in range(self.cfg.retries + 1):
            try:
                return await attempt()
            except WeightSyncError as err:
                last = err
                logger.warning("distributed weights {} failed (attempt {}): {}", step, n + 1, err)
                await self._close()
                if n < self.cfg.retries:
                    await anyio.sleep(backoff_s(n))
        raise WeightSyncError(
            f"distributed weights {step} failed after {self.cfg.retries + 1} attempts: {last}"
        ) from last


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
