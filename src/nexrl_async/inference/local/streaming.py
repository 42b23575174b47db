"""Responses that outlive their handler: SSE streams, and answers sent once requests finish.

:class:`EventStreamResponse` always listens for the client going away (Starlette only does so
for old ASGI servers) and closes the body generator in every case, so the generator's
``finally`` — which aborts the unfinished requests — runs at once, not at garbage collection.

:class:`WhenFinished` waits for its requests, then sends the response built from them; a client
that disconnects meanwhile aborts them. Only requests still running after ``WATCH_AFTER_S`` get
a task that watches for the client leaving: most answers take milliseconds, and a task per
request costs more than the rest of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from nexrl_async.inference.local.request import Request
from nexrl_async.inference.local.scheduler import Scheduler

DONE = b"data: [DONE]\n\n"


def sse(data: Any) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


async def updates(requests: list[Request]) -> AsyncIterator[list[Request]]:
    """Yield the requests that changed since the previous yield, until all have finished.

    The state at subscription time is not sent: the first chunk carries the first token.
    """
    notifier = requests[0].notifier
    sent = {id(r): 0 for r in requests}
    while True:
        seen = notifier.version
        changed = [r for r in requests if r.version != sent[id(r)]]
        for req in changed:
            sent[id(req)] = req.version
        if changed:
            yield changed
        if all(r.finished for r in requests):
            return
        await notifier.wait_past(seen)


def abort_unfinished(requests: list[Request], scheduler: Scheduler) -> None:
    for req in requests:
        if not req.finished:
            scheduler.abort(req.rid)


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` response whose body generator is closed when the client leaves."""

    body_iterator: AsyncGenerator[bytes, None]

    def __init__(self, content: AsyncGenerator[bytes, None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.body_iterator = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    # OSError: the client went away mid-send; the finally below cleans up.
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


WATCH_AFTER_S = 0.2
"""A :class:`WhenFinished` still waiting after this starts watching for its client leaving."""


class WhenFinished:
    """An ASGI response: wait for ``requests``, then send ``build()``."""

    def __init__(
        self, requests: list[Request], scheduler: Scheduler, build: Callable[[], Response]
    ) -> None:
        self.requests = requests
        self.scheduler = scheduler
        self.build = build

    def _all_finished(self) -> bool:
        return all(req.finished for req in self.requests)

    async def _finished(self) -> None:
        notifier = self.requests[0].notifier  # shared by the requests of one HTTP call
        while not self._all_finished():
            await notifier.wait_past(notifier.version)

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        abort_unfinished(self.requests, self.scheduler)  # a no-op once all have finished

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with anyio.move_on_after(WATCH_AFTER_S):
            await self._finished()
        if self._all_finished():
            await self.build()(scope, receive, send)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, receive)
            await self._finished()
            # the watcher ends by itself: uvicorn's receive answers http.disconnect once the
            # response is complete (never cancelled: a cancellation costs more than the rest)
            await self.build()(scope, receive, send)
