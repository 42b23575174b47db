"""One HTTP exchange with an SGLang server: auth, deadline, bounded retries, error mapping.

Mapping (core/errors.py): transport errors and 502/503/504 are retried with jittered exponential
backoff and become :class:`EngineUnavailable` once the budget is spent; other 5xx are
:class:`EngineUnavailable` at once; 4xx are :class:`RequestRejected` carrying the server's
message, never retried. The deadline covers every attempt and every backoff wait.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import msgspec
from loguru import logger

from nexrl_async.core.errors import EngineUnavailable, InferenceError, RequestRejected
from nexrl_async.inference.client.http import Http, as_pool
from nexrl_async.inference.client.retry import RETRYABLE_STATUS, RetryPolicy
from nexrl_async.inference.client.wire import error_message

BodyFor = Callable[[int], Any]
"""Builds the JSON body of attempt ``k`` (0-based), e.g. to give each retry a fresh rid."""


class Transport:
    """Sends requests to one server through the run's shared HTTP pool (``inference.http``)."""

    def __init__(
        self,
        base_url: str,
        *,
        http: Http,
        api_key: str | None,
        connect_timeout_s: float,
        retry: RetryPolicy,
        rng: random.Random,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = as_pool(http)
        self._headers = [("Authorization", f"Bearer {api_key}")] if api_key else []
        self._json_headers = [*self._headers, ("Content-Type", "application/json")]
        self._timeouts = httpx.Timeout(None, connect=connect_timeout_s).as_dict()
        self._urls: dict[str, httpx.URL] = {}
        self.retry = retry
        self._rng = rng

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _url(self, path: str) -> httpx.URL:
        """``path``'s URL, parsed once (httpx's URL parsing is a visible share of a request)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.url(path))
        return url

    async def request(
        self,
        method: str,
        path: str,
        *,
        timeout_s: float,
        body: Any = None,
        body_for: BodyFor | None = None,
        params: dict[str, str] | None = None,
        retries: int | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """A successful (< 400) response; with ``stream`` its body is still unread (close it).

        Raises :class:`RequestRejected`, or :class:`EngineUnavailable` after the retry budget
        or when ``timeout_s`` passes.
        """
        policy = self.retry if retries is None else self.retry.with_retries(retries)
        try:
            with anyio.fail_after(timeout_s):
                return await self._attempts(method, path, policy, body, body_for, params, stream)
        except TimeoutError as err:
            raise EngineUnavailable(
                f"{method} {self.url(path)}: no answer within {timeout_s:g} s"
            ) from err

    async def _attempts(
        self,
        method: str,
        path: str,
        policy: RetryPolicy,
        body: Any,
        body_for: BodyFor | None,
        params: dict[str, str] | None,
        stream: bool,
    ) -> httpx.Response:
        attempt = 0
        while True:
            payload = body_for(attempt) if body_for is not None else body
            try:
                return await self._once(method, path, payload, params, stream)
            except EngineUnavailable as err:
                if not err.retryable or attempt >= policy.retries:
                    raise
                delay = policy.delay_s(attempt, self._rng)
                logger.warning(
                    "{} {} failed ({}); retry {}/{} in {:.2f} s",
                    method,
                    path,
                    err,
                    attempt + 1,
                    policy.retries,
                    delay,
                )
                attempt += 1
                await anyio.sleep(delay)

    async def _once(
        self,
        method: str,
        path: str,
        payload: Any,
        params: dict[str, str] | None,
        stream: bool,
    ) -> httpx.Response:
        url = self._url(path)
        headers = self._headers
        content: bytes | None = None
        if payload is not None:
            content = msgspec.json.encode(payload)
            headers = self._json_headers
        request = httpx.Request(
            method,
            url,
            content=content,
            params=params,
            headers=headers,
            extensions={"timeout": self._timeouts},
        )
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.UnsupportedProtocol as err:
            raise _unavailable(f"{method} {url}: {err}", retryable=False) from err
        except httpx.TransportError as err:
            raise _unavailable(f"{method} {url}: {type(err).__name__}: {err}") from err
        if response.status_code < 400:
            return response
        try:
            raw = await response.aread()
        except httpx.TransportError as err:
            raise _unavailable(f"{method} {url}: HTTP {response.status_code}, {err}") from err
        finally:
            await response.aclose()
        raise status_error(response.status_code, raw, response.reason_phrase, str(url))


def status_error(status: int, body: bytes, reason: str, url: str) -> InferenceError:
    """The error for an HTTP error status (see the module docstring)."""
    message = error_message(body, reason)
    if status in RETRYABLE_STATUS:
        return _unavailable(f"HTTP {status} from {url}: {message}")
    if status >= 500:
        return _unavailable(f"HTTP {status} from {url}: {message}", retryable=False)
    return RequestRejected(status, message, url=url)


def _unavailable(message: str, *, retryable: bool = True) -> EngineUnavailable:
    err = EngineUnavailable(message)
    err.retryable = retryable
    return err
