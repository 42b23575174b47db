"""Responses that outlive their handler: SSE streams, and answers sent once requests finish.

:class:`EventStreamResponse` always listens for the client going away (Starlette only does so
for old ASGI servers) and closes the body generator in every case, so the generator's
``finally`` — which aborts the unfinished requests — runs at once, not at garbage collection.

:class:`WhenFinished` waits for its requests, then sends the response built from them; a client
that disconnects meanwhile aborts them. Only answers still waiting after ``WATCH_AFTER_S`` get a
task that watches for the client leaving (:class:`SlowWatch`, one sweeper per server): most
answers take milliseconds, and a task or a timer per request costs more than the rest of it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
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
"""An answer still waiting after this gets a task that watches for its client leaving."""


async def _watch(receive: Receive, requests: list[Request], scheduler: Scheduler) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    abort_unfinished(requests, scheduler)  # a no-op once all have finished


class SlowWatch:
    """Starts a disconnect watcher for each registered answer once it has waited
    ``WATCH_AFTER_S``. A watcher ends by itself: uvicorn's ``receive`` answers
    ``http.disconnect`` once the response is complete (it is never cancelled: a cancellation
    costs more than the rest of a small request)."""

    def __init__(self) -> None:
        self._waiting: dict[int, tuple[float, Receive, list[Request], Scheduler]] = {}

    def add(
        self, key: int, receive: Receive, requests: list[Request], scheduler: Scheduler
    ) -> None:
        self._waiting[key] = (time.monotonic(), receive, requests, scheduler)

    def remove(self, key: int) -> None:
        self._waiting.pop(key, None)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sweep every ``WATCH_AFTER_S / 2`` until cancelled."""
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                await anyio.sleep(WATCH_AFTER_S / 2)
                due = time.monotonic() - WATCH_AFTER_S
                for key, (since, receive, requests, scheduler) in list(self._waiting.items()):
                    if since <= due:
                        del self._waiting[key]
                        tg.start_soon(_watch, receive, requests, scheduler)


class WhenFinished:
    """An ASGI response: wait for ``requests``, then send ``build()``; registered with
    ``watch`` meanwhile, so a client that leaves aborts them."""

    def __init__(
        self,
        requests: list[Request],
        scheduler: Scheduler,
        build: Callable[[], Response],
        watch: SlowWatch,
    ) -> None:
        self.requests = requests
        self.scheduler = scheduler
        self.build = build
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        notifier = self.requests[0].notifier  # shared by the requests of one HTTP call
        self.watch.add(id(self), receive, self.requests, self.scheduler)
        try:
            while not all(req.finished for req in self.requests):
                await notifier.wait_past(notifier.version)
        finally:
            self.watch.remove(id(self))
        await self.build()(scope, receive, send)
