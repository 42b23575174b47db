"""The first turns of groups that start together, sent as one request per server.

A group's samples share their prompt, so its first turn is one request
(``FleetGenerator.generate_group``). Groups also start together: when a server finishes a batch,
every worker whose group was in it scores, takes its next item and asks for its next first turn
within a few milliseconds. :class:`FirstTurnBatcher` gathers the group requests that arrive
within ``window_s`` of the first one (same sampling parameters) and sends them as one request
per available server (SGLang's batch form, one rid per sample). On the demo, 32 group requests
a step become a handful: client and server CPU per request saved (``benchmarks/e2e.py``).
Where a server's batch size is known (``server_batch``: the local server's ``max_batch``), a
window that fills every available server's batch is sent at once: waiting longer could only
queue more samples behind a full batch (on the demo the 32 groups of a step fill it ~5 ms
before the window ends).

- A caller that is cancelled aborts its own samples on the server (by rid); the others run on
  and its answers are dropped.
- An error of the whole request (no server within the retries) is every caller's error. A
  rejection (4xx) is retried group by group, so only the group the server refuses fails.
- The batcher's tasks run inside :meth:`FirstTurnBatcher.serve` (the engine's task group); while
  it is not serving, :attr:`FirstTurnBatcher.serving` is false and callers send their own
  request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup
from loguru import logger

from nexrl_async.core.errors import EngineUnavailable, InferenceError, RequestRejected
from nexrl_async.inference.client.backend import GenerationBackend
from nexrl_async.inference.client.structs import GenerateResult, SamplingParams

Answer = GenerateResult | InferenceError


class FirstTurn:
    """One group's first turn waiting for, or riding in, a batched request."""

    def __init__(self, prompt: Sequence[int], keys: Sequence[str]) -> None:
        self.prompt = prompt
        self.keys = keys
        self.answers: list[Answer] = []
        self.url = ""
        self.error: Exception | None = None
        self.done = anyio.Event()
        self.cancelled = False
        self.batch: Batch | None = None
        """The request this turn rides in, once sent."""
        self.offset = 0
        """Where this turn's samples start in :attr:`Batch.rids`."""

    def finish(self, answers: list[Answer] | None, url: str, error: Exception | None) -> None:
        if not self.done.is_set():
            self.answers, self.url, self.error = answers or [], url, error
            self.done.set()


class Batch:
    """The first turns sent together in one request, and where that request runs."""

    def __init__(self, turns: list[FirstTurn], params: SamplingParams) -> None:
        self.turns = turns
        self.params = params
        self.client: GenerationBackend | None = None
        """The server's client, set by the sender once leased."""
        self.rids: list[str] = []
        """The samples' request ids on the wire (one per sample, turns in order)."""
        offset = 0
        for turn in turns:
            turn.batch, turn.offset = self, offset
            offset += len(turn.keys)

    @property
    def prompts(self) -> list[Sequence[int]]:
        return [turn.prompt for turn in self.turns for _ in turn.keys]

    @property
    def keys(self) -> list[str]:
        return [key for turn in self.turns for key in turn.keys]

    def deliver(self, answers: Sequence[Answer], url: str) -> None:
        for turn in self.turns:
            turn.finish(list(answers[turn.offset : turn.offset + len(turn.keys)]), url, None)


Send = Callable[[Batch], Awaitable[tuple[list[Answer], str]]]
"""Sends a batch (``generate_prompts`` on a leased server, setting ``client`` and ``rids``);
returns every sample's answer in order and the server's URL."""


class _Window:
    """The turns gathered for one request set (same sampling parameters)."""

    def __init__(self) -> None:
        self.turns: list[FirstTurn] = []
        self.samples = 0
        self.full = anyio.Event()


class FirstTurnBatcher:
    """Gathers group first turns for ``window_s`` (or until they fill every available server's
    ``server_batch`` samples) and sends them in ``servers()`` requests."""

    def __init__(
        self, send: Send, *, window_s: float, servers: Callable[[], int],
        server_batch: int | None = None,
    ) -> None:  # fmt: skip
        self._send = send
        self.window_s = window_s
        self._servers = servers
        self.server_batch = server_batch
        self._pending: dict[bytes, _Window] = {}
        """The open window of each sampling-parameter set."""
        self._closing: set[_Window] = set()
        """Windows closed as full whose requests are not out yet."""
        self._tg: TaskGroup | None = None
        self.requests = 0
        """Batched requests sent (each retry of a rejection per group counts too)."""

    @property
    def serving(self) -> bool:
        return self._tg is not None

    async def serve(self) -> None:
        """Run the batcher's tasks until cancelled; turns still waiting then fail."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await anyio.sleep_forever()
        finally:
            self._tg = None
            stopped = EngineUnavailable("the first-turn batcher stopped")
            for window in [*self._pending.values(), *self._closing]:
                for turn in window.turns:
                    turn.finish(None, "", stopped)
            self._pending.clear()
            self._closing.clear()

    async def submit(
        self, prompt: Sequence[int], keys: Sequence[str], params: SamplingParams
    ) -> tuple[list[Answer], str]:
        """One sample of ``prompt`` per key, sent with the other turns of this window; returns
        the answers in key order and the URL of the server that gave them."""
        if self._tg is None:
            raise RuntimeError("FirstTurnBatcher.submit() needs serve() running")
        turn = FirstTurn(prompt, keys)
        slot = msgspec.json.encode(params)
        window = self._pending.get(slot)
        if window is None:
            window = self._pending[slot] = _Window()
            self._spawn(self._flush, slot, window, params)
        window.turns.append(turn)
        window.samples += len(keys)
        if self.server_batch is not None and window.samples >= self.server_batch * max(
            1, self._servers()
        ):
            del self._pending[slot]  # later turns open a new window
            self._closing.add(window)
            window.full.set()
        try:
            await turn.done.wait()
        except anyio.get_cancelled_exc_class():
            turn.cancelled = True
            self._abort(turn)
            raise
        if turn.error is not None:
            raise turn.error
        return turn.answers, turn.url

    async def _flush(self, slot: bytes, window: _Window, params: SamplingParams) -> None:
        with anyio.move_on_after(self.window_s):
            await window.full.wait()
        if self._pending.get(slot) is window:
            del self._pending[slot]
        self._closing.discard(window)
        turns = [t for t in window.turns if not t.cancelled]
        servers = max(1, min(self._servers(), len(turns)))
        for index in range(servers):
            if share := turns[index::servers]:
                self._spawn(self._run, Batch(share, params))

    async def _run(self, batch: Batch) -> None:
        self.requests += 1
        try:
            answers, url = await self._send(batch)
            batch.deliver(answers, url)
        except RequestRejected as err:
            if len(batch.turns) == 1:
                batch.turns[0].finish(None, "", err)
            else:  # one group's prompt may be the cause: each group alone, only it fails
                logger.debug("a batched first-turn request was rejected; sending each group alone")
                for turn in batch.turns:
                    if not turn.cancelled:
                        self._spawn(self._run, Batch([turn], batch.params))
                return
        except Exception as err:  # noqa: BLE001 - every caller's error; each raises it
            for turn in batch.turns:
                turn.finish(None, "", err)
        finally:
            for turn in batch.turns:
                if turn.batch is batch:
                    turn.finish(None, "", EngineUnavailable("the first-turn request ended"))

    def _abort(self, turn: FirstTurn) -> None:
        """Abort a cancelled caller's samples where its request runs (in the background)."""
        batch = turn.batch
        if batch is None or batch.client is None or self._tg is None:
            return  # not sent yet, or the batcher stopped (its requests were aborted with it)
        rids = batch.rids[turn.offset : turn.offset + len(turn.keys)]
        self._spawn(_abort_quietly, batch.client, rids)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, object]], *args: object) -> None:
        """Start ``fn(*args)`` in :meth:`serve`'s task group (it runs: callers submitted, or
        are tasks of it)."""
        assert self._tg is not None, "FirstTurnBatcher tasks need serve() running"
        self._tg.start_soon(fn, *args)


async def _abort_quietly(client: GenerationBackend, rids: list[str]) -> None:
    with anyio.move_on_after(5.0):
        for rid in rids:
            try:
                await client.abort_request(rid)
            except InferenceError as err:
                logger.debug("abort of {} failed: {}", rid, err)
