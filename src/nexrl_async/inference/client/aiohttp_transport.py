"""An ``httpx`` transport on aiohttp: the httpx API above, aiohttp's C HTTP/1.1 parser below.

Why (``benchmarks/inference.py``, against a zero-latency server on the 2-core CPU box):
httpcore spends most of a request's CPU in pure-Python HTTP parsing (h11) and pool bookkeeping
whose cost grows with the square of the concurrent streams (encode/httpcore#1035); aiohttp
parses in C and keeps a flat pool. Callers keep every httpx type: requests, responses,
streams, errors, and ``httpx.MockTransport`` / ``ASGITransport`` in tests.

Scope: plain HTTP/1.1 to inference servers, asyncio only (the engine runs anyio on asyncio).
aiohttp errors become httpx's: connection failures :class:`httpx.ConnectError`, a dropped or
broken response :class:`httpx.ReadError` / :class:`httpx.RemoteProtocolError`, a connect
timeout :class:`httpx.ConnectTimeout`, a URL aiohttp cannot serve
:class:`httpx.UnsupportedProtocol`. Total deadlines belong to the caller (``transport.py``);
only the connect timeout of the request's ``httpx.Timeout`` is applied here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from aiohttp.client_exceptions import InvalidURL, NonHttpUrlClientError

KEEPALIVE_S = 4.0
"""Idle connections are closed after this: under uvicorn's 5 s, so the client, not the server,
ends an idle connection (no request races the server's close)."""


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests through one aiohttp session (opened on first use, on the running
    event loop), with no connection cap: the router caps requests per server."""

    def __init__(self, *, keepalive_s: float = KEEPALIVE_S) -> None:
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self._keepalive_s)
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # httpx decodes Content-Encoding itself
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session
        if session is None or session.closed:
            session = self._session = self._open()
        connect_s = request.extensions.get("timeout", {}).get("connect")
        try:
            response = await session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=await request.aread() or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_s),
            )
        except aiohttp.ClientError as err:
            raise _httpx_error(err, request) from err
        except TimeoutError as err:  # aiohttp's connect timeout from older releases
            raise httpx.ConnectTimeout(f"no connection in {connect_s} s", request=request) from err
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": _reason(response)},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Body(httpx.AsyncByteStream):
    """A response body read from aiohttp as it arrives; closing it before the end drops the
    connection (the server sees the disconnect), after the end returns it to the pool."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as err:
            raise _httpx_error(err, self._request) from err

    async def aclose(self) -> None:
        self._response.release()


def _httpx_error(err: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    message = f"{type(err).__name__}: {err}"
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(err, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(err, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(err, InvalidURL | NonHttpUrlClientError):
        return httpx.UnsupportedProtocol(message, request=request)
    if isinstance(err, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message, request=request)
    return httpx.ReadError(message, request=request)


def _reason(response: aiohttp.ClientResponse) -> bytes:
    return (response.reason or "").encode("latin-1", errors="replace")
