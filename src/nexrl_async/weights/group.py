"""One weight-update broadcast group: the trainer's sender plus the servers that joined it.

docs/sglang_api.md §4.1 is the protocol. Rank 0 is the trainer's sender; server ``i`` joins as
``rank_offset = 1 + Σ tp_size of the servers before it`` (``tp_size`` from ``/server_info``), so
``world_size = 1 + Σ tp_size``. The HTTP calls block until their collective completes, so each
is fired concurrently with the trainer's side:

    open   POST /init_weights_update_group on every server (tasks) ‖ sender.connect() (thread)
    send   begin_weight_update on every server (404: SGLang < 0.5.23, no session needed)
           ‖ the trainer plans the buckets (thread)
           per server, bucket after bucket: POST /update_weights_from_distributed
               (names/dtypes/shapes in order, flush_cache false, weight_version on the last)
               ‖ sender.send_buckets(buckets) (thread)
           end_weight_update on every server that opened a session
    close  sender aborted and released; POST /destroy_weights_update_group everywhere

Nothing waits forever: HTTP calls carry ``weights.step_timeout_s``, the sender's collectives time
out after the same, a failed HTTP call aborts the sender at once (its pending broadcast returns),
and a failed broadcast cancels the pending HTTP calls. Failures raise :class:`WeightSyncError`
naming the server (or the trainer) and the step; a failed group is closed, never reused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Generic, Literal, Protocol, TypeVar

import anyio
import anyio.to_thread
from loguru import logger
from torch import Tensor

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import InferenceError, RequestRejected, WeightSyncError
from nexrl_async.inference.client.control import ServerControl
from nexrl_async.weights.steps import best_effort, each_server, retryable, unwrapped

LoadFormat = Literal["flattened_bucket"] | None
Backend = Literal["gloo", "nccl"]
CLEANUP_S = 10.0
"""Bound of best-effort cleanup (leave groups, end sessions, release the sender)."""

Failures = list[tuple[str, BaseException]]
"""``(where, error)``: ``"init on http://…"``, ``"transfer on the trainer (rank 0)"``."""


class GroupError(WeightSyncError):
    """A group step failed; ``retryable`` when a server did not answer or the trainer's side
    failed on its own (a peer died), not when a server rejected the update."""

    def __init__(self, failures: Failures) -> None:
        servers = [err for where, err in failures if "the trainer" not in where]
        self.retryable = any(retryable(err) for err in servers) or not servers
        # servers first: a trainer-side error is usually their consequence
        ordered = sorted(failures, key=lambda f: "the trainer" in f[0])
        super().__init__("; ".join(f"{where}: {err}" for where, err in ordered))


class WireBucket(Protocol):
    """What one ``/update_weights_from_distributed`` call announces."""

    @property
    def names(self) -> list[str]: ...
    @property
    def dtypes(self) -> list[str]: ...
    @property
    def shapes(self) -> list[list[int]]: ...
    @property
    def nbytes(self) -> int: ...


BucketT = TypeVar("BucketT", bound=WireBucket)


class Sender(Protocol[BucketT]):
    """Rank 0 of a group (``nexrl_async.weights.sender.WeightSender``); blocking methods."""

    port: int

    def connect(self) -> None: ...

    def plan(
        self, named_tensors: Iterable[tuple[str, Tensor]], *, bucket_mb: int
    ) -> list[BucketT]: ...

    def send_buckets(self, buckets: Sequence[BucketT], load_format: LoadFormat = ...) -> int: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class SenderFactory(Protocol[BucketT]):
    """Builds the sender of a group (``WeightSender`` itself fits)."""

    def __call__(
        self,
        *,
        master_address: str,
        master_port: int,
        world_size: int,
        group_name: str,
        backend: Backend,
        timeout_s: float,
    ) -> Sender[BucketT]: ...


class BroadcastGroup(Generic[BucketT]):
    """A group over ``clients`` named ``name`` (see the module docstring)."""

    def __init__(
        self,
        cfg: WeightsConfig,
        *,
        name: str,
        clients: Mapping[str, ServerControl],
        factory: SenderFactory[BucketT],
        master_address: str,
        backend: Backend,
        load_format: LoadFormat,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.clients = clients
        self.factory = factory
        self.master_address = master_address
        self.backend = backend
        self.load_format: LoadFormat = load_format
        self.sender: Sender[BucketT] | None = None

    # ------------------------------------------------------------------ open

    async def open(self) -> Sender[BucketT]:
        """Build the sender and make every server join; raises :class:`WeightSyncError`."""
        offsets, world = await self._layout()
        sender = await anyio.to_thread.run_sync(self._new_sender, world)
        self.sender = sender
        failures: Failures = []
        async with anyio.create_task_group() as tg:
            for url, client in self.clients.items():
                tg.start_soon(self._join, url, client, sender, offsets[url], world, failures, tg)
            try:
                await anyio.to_thread.run_sync(sender.connect, abandon_on_cancel=True)
            except WeightSyncError as err:
                failures.append(("init on the trainer (rank 0)", err))
                tg.cancel_scope.cancel()
        if failures:
            raise GroupError(failures)
        return sender

    def _new_sender(self, world: int) -> Sender[BucketT]:
        return self.factory(
            master_address=self.master_address,
            master_port=self.cfg.master_port,
            world_size=world,
            group_name=self.name,
            backend=self.backend,
            timeout_s=self.cfg.step_timeout_s,
        )

    async def _layout(self) -> tuple[dict[str, int], int]:
        """Rank offset per server and the world size, from each server's ``tp_size``."""
        sizes: dict[str, int] = {}

        async def tp_size(client: ServerControl) -> None:
            info = await client.server_info(timeout_s=self.cfg.step_timeout_s)
            sizes[client.base_url] = max(1, info.tp_size or 1)

        await each_server(self.cfg, self.clients, "init", tp_size, retries=0)
        offsets, next_rank = {}, 1
        for url, client in self.clients.items():
            offsets[url] = next_rank
            next_rank += sizes[client.base_url]
        return offsets, next_rank

    async def _join(
        self,
        url: str,
        client: ServerControl,
        sender: Sender[BucketT],
        offset: int,
        world: int,
        failures: Failures,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        try:
            await client.init_weights_update_group(
                self.master_address,
                sender.port,
                offset,
                world,
                group_name=self.name,
                backend=self.backend,
                timeout_s=self.cfg.step_timeout_s,
            )
        except (InferenceError, WeightSyncError) as err:
            failures.append((f"init on {url}", err))
            sender.abort()
            tg.cancel_scope.cancel()

    # ------------------------------------------------------------------ send

    async def send(self, plan: Callable[[], Awaitable[Sequence[BucketT]]], version: int) -> int:
        """Broadcast the buckets ``plan()`` makes into every server as weights ``version``
        (the sessions open while it plans); returns bytes."""
        sender = self.sender
        if sender is None:
            raise WeightSyncError(f"weight-update group {self.name} is not open")
        sessions, buckets = await self._begin_while(plan)
        done = False
        try:
            nbytes = await self._broadcast(sender, buckets, version)
            await each_server(
                self.cfg,
                {u: c for u, c in self.clients.items() if sessions[u]},
                "end",
                lambda c: c.end_weight_update(timeout_s=self.cfg.step_timeout_s),
                retries=0,
            )
            done = True
        finally:
            if not done:
                await best_effort(
                    {u: c for u, c in self.clients.items() if sessions[u]},
                    "end",
                    lambda c: c.end_weight_update(timeout_s=CLEANUP_S),
                    timeout_s=CLEANUP_S,
                )
        return nbytes

    async def _begin_while(
        self, plan: Callable[[], Awaitable[Sequence[BucketT]]]
    ) -> tuple[dict[str, bool], Sequence[BucketT]]:
        """:meth:`_begin` concurrently with ``plan()`` (an HTTP round trip less on the way)."""
        sessions: list[dict[str, bool]] = []

        async def begin() -> None:
            sessions.append(await self._begin())

        with unwrapped():
            async with anyio.create_task_group() as tg:
                tg.start_soon(begin)
                buckets = await plan()
        return sessions[0], buckets

    async def _begin(self) -> dict[str, bool]:
        """Open a session on every server that has them; a session left open by an earlier
        failure is closed and opened again."""
        opened: dict[str, bool] = {}

        async def begin(client: ServerControl) -> None:
            timeout_s = self.cfg.step_timeout_s
            try:
                opened[client.base_url] = await client.begin_weight_update(timeout_s=timeout_s)
            except RequestRejected as err:
                if "already open" not in err.message:
                    raise
                await client.end_weight_update(timeout_s=timeout_s)
                opened[client.base_url] = await client.begin_weight_update(timeout_s=timeout_s)

        await each_server(self.cfg, self.clients, "begin", begin, retries=0)
        return {url: opened[client.base_url] for url, client in self.clients.items()}

    async def _broadcast(
        self, sender: Sender[BucketT], buckets: Sequence[BucketT], version: int
    ) -> int:
        failures: Failures = []
        nbytes = 0
        async with anyio.create_task_group() as tg:
            for url, client in self.clients.items():
                tg.start_soon(self._post, url, client, sender, buckets, version, failures)
            try:
                nbytes = await anyio.to_thread.run_sync(
                    sender.send_buckets, buckets, self.load_format, abandon_on_cancel=True
                )
            except WeightSyncError as err:
                failures.append(("transfer on the trainer (rank 0)", err))
                tg.cancel_scope.cancel()  # the servers' calls would wait for a broadcast
            except BaseException:
                sender.abort()  # cancelled: the abandoned thread returns within a poll
                raise
        if failures:
            raise GroupError(failures)
        return nbytes

    async def _post(
        self,
        url: str,
        client: ServerControl,
        sender: Sender[BucketT],
        buckets: Sequence[BucketT],
        version: int,
        failures: Failures,
    ) -> None:
        last = len(buckets) - 1
        try:
            for i, bucket in enumerate(buckets):
                await client.update_weights_from_distributed(
                    bucket.names,
                    bucket.dtypes,
                    bucket.shapes,
                    group_name=self.name,
                    weight_version=version if i == last else None,
                    flush_cache=False,
                    load_format=self.load_format,
                    timeout_s=self.cfg.step_timeout_s,
                )
        except (InferenceError, WeightSyncError) as err:
            failures.append((f"transfer on {url}", err))
            sender.abort()  # its broadcast would wait for this server until the timeout

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Abort and release the sender, make every server leave the group (best effort)."""
        sender, self.sender = self.sender, None
        if sender is not None:
            sender.abort()
        await best_effort(
            self.clients,
            "destroy",
            lambda c: c.destroy_weights_update_group(self.name, timeout_s=CLEANUP_S),
            timeout_s=CLEANUP_S,
        )
        if sender is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_S):
                # a broadcast still in flight holds the backend until its timeout
                await anyio.to_thread.run_sync(sender.close, abandon_on_cancel=True)
        logger.debug("weight-update group {} closed", self.name)
