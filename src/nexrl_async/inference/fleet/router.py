"""Request routing over the fleet's servers: least outstanding, sticky per trajectory, capped.

``Router.lease(key)`` is how every request gets a server::

    async with router.lease(f"{group_id}:{sample}") as server:
        await client.generate(server.url, ...)

- **Least outstanding**: a new key goes to the available server with the fewest leases (running
  or waiting for a slot), ties broken by fewest leases granted so far, then by index.
- **Sticky**: a key stays on its server across turns (KV-cache reuse) while that server is
  available and has a free slot (or no other server has one); ``stick(keys, server)`` binds
  the other samples of a group request to the server that answers it; ``release(key)``
  forgets a key when the trajectory ends. At most ``max_sticky_keys`` keys are remembered
  (oldest forgotten).
- **Capped**: at most ``max_concurrency`` leases run per server (an anyio Semaphore, FIFO).
- **Down servers**: ``mark_down`` takes a server out of routing, re-routes leases waiting for
  its slots, and cancels the leases running on it: their ``async with`` body raises
  :class:`EngineUnavailable` (retryable) at once instead of hanging on a dead socket.
- **Pause**: while paused (weight publication) new leases wait; ``wait_drained`` waits until no
  lease runs; ``cut_running`` cancels the leases running on a server that stays routable (their
  body raises :class:`LeaseCut`: a request held at a paused server's gate, see the publisher).
- **Fail/close**: after ``fail(err)`` every waiting and new lease raises ``EngineUnavailable``.

Pure anyio state: no processes, no HTTP. One event loop only (not thread-safe).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from loguru import logger

from nexrl_async.core.errors import EngineUnavailable


class LeaseCut(EngineUnavailable):
    """The lease's request was cut on a server that stays up (:meth:`Router.cut_running`):
    nothing of it came back, so it is sent again on a fresh lease without spending a retry."""


class ServerHandle:
    """One inference server as the router and its users see it."""

    def __init__(
        self,
        index: int,
        url: str,
        *,
        max_concurrency: int,
        log_path: Path | None = None,
        launched: bool = False,
    ) -> None:
        self.index = index
        self.url = url
        self.max_concurrency = max_concurrency
        self.log_path = log_path
        """Where a launched server's stdout/stderr go (``None`` when attached)."""
        self.launched = launched
        self.pid: int | None = None
        """Process id of the running launched server, ``None`` while down or when attached."""
        self.weight_version: str | None = None
        """Weights the server holds, as the weight publisher last verified (``None``: initial)."""
        self.available = False
        """Healthy and routable."""
        self.down_reason = "not started"
        self.restarts = 0
        self.outstanding = 0
        """Leases assigned to this server: running plus waiting for a slot."""
        self.active = 0
        """Leases running on this server."""
        self.leases = 0
        """Leases granted so far."""
        self._slots = anyio.Semaphore(max_concurrency)
        self._waiting: set[anyio.CancelScope] = set()
        self._running: set[anyio.CancelScope] = set()
        self._cut: set[anyio.CancelScope] = set()

    def __repr__(self) -> str:
        state = "up" if self.available else f"down ({self.down_reason})"
        return f"ServerHandle({self.index}, {self.url}, {state}, outstanding={self.outstanding})"

    def describe(self) -> str:
        """``inference server 0 (http://…)``, plus the log file when launched."""
        log = f", log {self.log_path}" if self.log_path is not None else ""
        return f"inference server {self.index} ({self.url}{log})"


class Router:
    """Routing state over a fixed list of servers; see the module docstring."""

    def __init__(self, servers: Sequence[ServerHandle], *, max_sticky_keys: int = 65536) -> None:
        self.servers = list(servers)
        self._max_sticky_keys = max_sticky_keys
        self._sticky: OrderedDict[str, ServerHandle] = OrderedDict()
        self._changed = anyio.Event()
        self._open = anyio.Event()
        self._open.set()
        self._failure: str | None = None

    # ------------------------------------------------------------------ picking (synchronous)
    def pick(self, key: str | None = None) -> ServerHandle | None:
        """The server a lease for ``key`` goes to now (binding ``key`` to it), or ``None``."""
        up = [server for server in self.servers if server.available]
        if not up:
            return None
        free = [server for server in up if server.outstanding < server.max_concurrency]
        if key is not None:
            bound = self._sticky.get(key)
            if bound is not None and bound.available and (bound in free or not free):
                self._sticky.move_to_end(key)
                return bound
        best = min(free or up, key=lambda s: (s.outstanding, s.leases, s.index))
        if key is not None:
            self.stick([key], best)
        return best

    def stick(self, keys: Iterable[str], server: ServerHandle) -> None:
        """Bind ``keys`` to ``server``: the samples of a group request it answers, so that
        their later turns go there too."""
        for key in keys:
            self._sticky[key] = server
            self._sticky.move_to_end(key)
        while len(self._sticky) > self._max_sticky_keys:
            self._sticky.popitem(last=False)

    def release(self, key: str) -> None:
        """Forget the server of ``key`` (its trajectory ended)."""
        self._sticky.pop(key, None)

    def sticky_server(self, key: str) -> ServerHandle | None:
        """The server ``key`` is bound to, if any."""
        return self._sticky.get(key)

    # ------------------------------------------------------------------ leases
    @asynccontextmanager
    async def lease(self, key: str | None = None) -> AsyncIterator[ServerHandle]:
        """Hold one request slot on a server; raises ``EngineUnavailable`` if it goes down."""
        server = await self._acquire(key)
        scope = anyio.CancelScope()
        server._running.add(scope)
        server.active += 1
        try:
            with scope:
                yield server
        finally:
            cut = scope in server._cut
            server._cut.discard(scope)
            server._running.discard(scope)
            server.active -= 1
            server.outstanding -= 1
            server._slots.release()
            self._notify()
        if scope.cancelled_caught and cut and server.available:
            raise LeaseCut(f"{server.describe()} cut the request (held at its paused gate)")
        if scope.cancelled_caught:
            raise EngineUnavailable(
                f"{server.describe()} went down during the request: {server.down_reason}"
            )

    async def _acquire(self, key: str | None) -> ServerHandle:
        if not self.servers:
            raise EngineUnavailable("this run has no inference servers (inference.backend = none)")
        while True:
            changed, is_open = self._changed, self._open
            self._raise_if_failed()
            if not is_open.is_set():
                await is_open.wait()
                continue
            server = self.pick(key)
            if server is None:
                await changed.wait()
                continue
            if not await self._take_slot(server):
                continue  # the server went down while we waited: pick again
            if self._open.is_set() and server.available and self._failure is None:
                server.leases += 1
                return server
            server.outstanding -= 1  # paused or failed meanwhile: give the slot back, retry
            server._slots.release()
            self._notify()

    async def _take_slot(self, server: ServerHandle) -> bool:
        server.outstanding += 1
        scope = anyio.CancelScope()
        server._waiting.add(scope)
        try:
            with scope:
                await server._slots.acquire()
        except BaseException:
            server.outstanding -= 1  # cancelled from outside: nothing acquired
            raise
        finally:
            server._waiting.discard(scope)
        if scope.cancelled_caught:
            server.outstanding -= 1
            return False
        return True

    # ------------------------------------------------------------------ state changes
    def mark_up(self, server: ServerHandle) -> None:
        """The server is healthy: route to it."""
        server.available = True
        server.down_reason = ""
        self._notify()

    def mark_down(self, server: ServerHandle, reason: str) -> None:
        """Take the server out of routing; its running leases fail, its waiting ones re-route."""
        server.available = False
        server.down_reason = reason
        for scope in (*server._waiting, *server._running):
            scope.cancel()
        self._notify()

    def cut_running(self, server: ServerHandle, reason: str) -> int:
        """Cancel the leases running on ``server``, which stays routable: their body raises
        :class:`LeaseCut` (the request is sent again on a fresh lease). Returns how many."""
        for scope in server._running:
            scope.cancel()
            server._cut.add(scope)
        if server._running:
            logger.warning("cut {} request(s) on {}: {}", len(server._running), server.url, reason)
        return len(server._running)

    def fail(self, reason: str) -> None:
        """The fleet is down or closed: every lease, waiting or new, raises EngineUnavailable."""
        if self._failure is None:
            self._failure = reason
        for server in self.servers:
            self.mark_down(server, reason)
        self._open.set()

    def pause(self) -> None:
        """Hold new leases (running ones continue) until :meth:`resume`."""
        if self._open.is_set():
            self._open = anyio.Event()

    def resume(self) -> None:
        """Let held leases go."""
        self._open.set()

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    @property
    def active(self) -> int:
        """Leases running now, all servers."""
        return sum(server.active for server in self.servers)

    async def wait_all_up(self) -> None:
        """Wait until every server is available (raises if the fleet fails first)."""
        while True:
            changed = self._changed
            self._raise_if_failed()
            if all(server.available for server in self.servers):
                return
            await changed.wait()

    async def wait_drained(self) -> None:
        """Wait until no lease runs (use while paused, or new leases keep it busy)."""
        while self.active:
            await self._changed.wait()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise EngineUnavailable(f"inference fleet unavailable: {self._failure}")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
