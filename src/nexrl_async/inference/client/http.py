"""The run's HTTP connections: httpx clients on aiohttp, the engine's requests sent straight to
the transport.

Measured per ``/generate`` request against a zero-latency server (``benchmarks/inference.py``,
the shared 2-core CPU box, 32 in flight; client CPU per request, all in one run; on a more
saturated box every figure doubled, the ratios held):

- httpx on httpcore: pure-Python HTTP parsing (h11) and a connection pool that re-scans every
  connection for every queued request (encode/httpcore#1035, unfixed in 1.0.9), whose cost
  grows with the square of the concurrent streams: 1.5 ms over 8 clients, 6 ms with one;
- httpx on aiohttp (``aiohttp_transport.py``): C parsing, a flat pool: 0.8 ms;
- the same transport called directly, without ``httpx.AsyncClient.send`` (URL and header
  merging, auth and redirect flows, cookie extraction: about half of what is left): 0.4 ms,
  above 2,000 requests per CPU-second. Bare aiohttp: 0.25 ms.

So :func:`open_http_pool` builds clients on :class:`AiohttpTransport` and :meth:`HttpPool.send`
hands requests to that transport directly. Requests, responses, streams and errors stay
httpx's. A plain ``httpx.AsyncClient`` (tests swap the network for ``MockTransport`` or
``ASGITransport``) is accepted wherever a pool is (:func:`as_pool`); its requests go through
``client.send``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import httpx

from nexrl_async.inference.client.aiohttp_transport import AiohttpTransport

DEFAULT_SHARDS = 1
"""One client: aiohttp's pool has no per-stream scan, so sharding no longer pays."""


class HttpPool:
    """``httpx.AsyncClient`` s used round-robin; ``transports[i]``, when given, is the transport
    of ``clients[i]``, to which :meth:`send` hands requests directly."""

    def __init__(
        self,
        clients: Sequence[httpx.AsyncClient],
        *,
        transports: Sequence[httpx.AsyncBaseTransport | None] | None = None,
    ) -> None:
        if not clients:
            raise ValueError("an HttpPool needs at least one client")
        direct = list(transports) if transports is not None else [None] * len(clients)
        if len(direct) != len(clients):
            raise ValueError("an HttpPool needs one transport entry per client")
        self.clients = tuple(clients)
        self._order = itertools.cycle(list(zip(self.clients, direct, strict=True)))

    def pick(self) -> httpx.AsyncClient:
        """The client for the next request."""
        return next(self._order)[0]

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send ``request`` on the next client; the body is read unless ``stream``."""
        client, transport = next(self._order)
        if transport is None:
            return await client.send(request, stream=stream)
        response = await transport.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response


Http = httpx.AsyncClient | HttpPool
"""What clients, transports and the fleet accept: one client or a pool of them."""


def as_pool(http: Http) -> HttpPool:
    """``http`` itself, or a pool of that one client."""
    return http if isinstance(http, HttpPool) else HttpPool([http])


@asynccontextmanager
async def open_http_pool(shards: int = DEFAULT_SHARDS) -> AsyncIterator[HttpPool]:
    """``shards`` clients on aiohttp with no total deadline and no connection cap, closed on
    exit."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    async with AsyncExitStack() as stack:
        transports = [AiohttpTransport() for _ in range(shards)]
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(transport=t, timeout=None))
            for t in transports
        ]
        yield HttpPool(clients, transports=transports)
