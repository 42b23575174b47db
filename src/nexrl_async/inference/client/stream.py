"""A streamed ``/generate`` request: an async context manager that yields delta chunks.

```
async with client.stream_generate(input_ids, sampling) as stream:
    async for chunk in stream:          # StreamChunk: new token ids + logprobs
        ...
result = stream.result                  # GenerateResult, once the final event arrived
```

Leaving the block before the server finished the request (cancellation, timeout, ``break``, a
broken stream) aborts it on the server: ``POST /abort_request`` with the rid, in a shielded
scope with a short grace deadline. No cancel scope spans a ``yield``: every network read sits
under its own deadline computed from the request's overall deadline.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
import httpx

from nexrl_async.core.errors import EngineUnavailable, GenerationError
from nexrl_async.inference.client.accumulator import StreamAccumulator
from nexrl_async.inference.client.sse import DONE, SSEDecoder
from nexrl_async.inference.client.structs import GenerateResult, StreamChunk, StreamMode
from nexrl_async.inference.client.transport import Transport

AbortFn = Callable[[str], Awaitable[None]]


def attempt_rid(rid: str, attempt: int) -> str:
    """The rid of attempt ``attempt``: retries get a suffix so a request the server may still
    hold from the failed attempt cannot make the retry a duplicate-rid 400."""
    return rid if attempt == 0 else f"{rid}-retry{attempt}"


class GenerationStream:
    """One streamed generation. Create it with ``SGLangClient.stream_generate``."""

    def __init__(
        self,
        transport: Transport,
        *,
        body: dict[str, Any],
        return_logprob: bool,
        mode: StreamMode,
        timeout_s: float,
        abort: AbortFn,
        close_grace_s: float,
    ) -> None:
        self._transport = transport
        self._body = body
        self._timeout_s = timeout_s
        self._abort = abort
        self._close_grace_s = close_grace_s
        self._accumulator = StreamAccumulator(return_logprob=return_logprob, mode=mode)
        self._response: httpx.Response | None = None
        self._iterator: AsyncGenerator[StreamChunk, None] | None = None
        self._deadline = 0.0
        self.rid: str = str(body["rid"])
        """The rid of the current attempt (what ``/abort_request`` targets)."""

    @property
    def result(self) -> GenerateResult:
        """The finished generation; raises :class:`GenerationError` before the final event."""
        if self._accumulator.result is None:
            raise GenerationError(f"stream {self.rid} has not finished")
        return self._accumulator.result

    def _body_for(self, attempt: int) -> dict[str, Any]:
        self.rid = attempt_rid(str(self._body["rid"]), attempt)
        return {**self._body, "rid": self.rid}

    async def __aenter__(self) -> GenerationStream:
        self._deadline = anyio.current_time() + self._timeout_s
        try:
            self._response = await self._transport.request(
                "POST",
                "/generate",
                body_for=self._body_for,
                timeout_s=self._timeout_s,
                stream=True,
            )
        except anyio.get_cancelled_exc_class():
            await self._shutdown(abort=True)
            raise
        except EngineUnavailable as err:
            await self._shutdown(abort=isinstance(err.__cause__, TimeoutError))
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown(abort=not self._accumulator.server_done)

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        if self._response is None:
            raise RuntimeError("enter the stream first: `async with client.stream_generate(...)`")
        if self._iterator is not None:
            raise RuntimeError("a GenerationStream can be iterated once")
        self._iterator = self._chunks(self._response)
        return self._iterator

    async def _chunks(self, response: httpx.Response) -> AsyncGenerator[StreamChunk, None]:
        texts = response.aiter_text()
        decoder = SSEDecoder()
        while True:
            text = await self._next_text(texts)
            events = decoder.feed_text(text) if text is not None else [decoder.flush()]
            for data in events:
                if data == DONE:
                    self._check_finished()
                    return
                if data is not None:
                    yield self._accumulator.feed(data)
            if text is None:
                self._check_finished()
                return

    def _check_finished(self) -> None:
        """The body ended (or ``[DONE]`` came): the final event must have arrived."""
        if self._accumulator.result is None:
            raise GenerationError(
                f"stream {self.rid} from {self._transport.base_url} ended before the request "
                f"finished ({len(self._accumulator.token_ids)} tokens received)"
            )

    async def _next_text(self, texts: AsyncIterator[str]) -> str | None:
        """The next piece of body text (``None`` at the end), under the request's deadline."""
        remaining = max(self._deadline - anyio.current_time(), 0.0)
        try:
            with anyio.fail_after(remaining):
                return await anext(texts, None)
        except TimeoutError as err:
            raise EngineUnavailable(
                f"generate {self.rid}: not finished within {self._timeout_s:g} s"
            ) from err
        except httpx.TransportError as err:
            raise GenerationError(
                f"stream {self.rid} from {self._transport.base_url} broke off: "
                f"{type(err).__name__}: {err}"
            ) from err

    async def _shutdown(self, *, abort: bool) -> None:
        """Abort the request if the server may still run it, then close the connection.

        ``abort`` is itself shielded and bounded (``ServerControl._abort_quietly``)."""
        with anyio.CancelScope(shield=True):
            if abort:
                await self._abort(self.rid)
            with anyio.move_on_after(self._close_grace_s):
                if self._iterator is not None:
                    await self._iterator.aclose()
                if self._response is not None:
                    await self._response.aclose()
