"""The run's HTTP connections: a few independent ``httpx`` pools, requests spread over them.

httpcore's connection pool re-scans every open connection for every queued request each time a
request starts or ends (encode/httpcore#1035, unfixed in 1.0.9), so its CPU cost grows with the
square of the concurrent streams. With 64 rollouts in flight that bookkeeping took over half of
the engine's event loop, more than the requests themselves. :class:`HttpPool` hands requests
round-robin to ``shards`` clients, so each pool holds ``1/shards`` of the streams and the
bookkeeping shrinks by ``shards²``. One plain ``httpx.AsyncClient`` is accepted wherever a pool
is (:func:`as_pool`), which tests and scripts use.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import httpx

DEFAULT_SHARDS = 8
"""Enough that each pool stays at a handful of streams for the usual 8-64 concurrent rollouts."""

KEEPALIVE_PER_SHARD = 64


class HttpPool:
    """Independent ``httpx.AsyncClient`` s; :meth:`pick` returns the next one, round-robin."""

    def __init__(self, clients: Sequence[httpx.AsyncClient]) -> None:
        if not clients:
            raise ValueError("an HttpPool needs at least one client")
        self.clients = tuple(clients)
        self._order = itertools.cycle(self.clients)

    def pick(self) -> httpx.AsyncClient:
        """The client for the next request."""
        return next(self._order)


Http = httpx.AsyncClient | HttpPool
"""What clients, transports and the fleet accept: one client or a pool of them."""


def as_pool(http: Http) -> HttpPool:
    """``http`` itself, or a pool of that one client."""
    return http if isinstance(http, HttpPool) else HttpPool([http])


@asynccontextmanager
async def open_http_pool(shards: int = DEFAULT_SHARDS) -> AsyncIterator[HttpPool]:
    """``shards`` clients with no total deadline and no connection cap, closed on exit."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=KEEPALIVE_PER_SHARD)
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=None))
            for _ in range(shards)
        ]
        yield HttpPool(clients)
