"""Per-server publication steps: a deadline on every call, a retry budget, one error.

A publication addresses :class:`Targets`: the servers that are up in the fleet and not dropped
yet. A step on a server that fails is retried ``weights.retries`` times, and past that for at
least ``window_s`` while the failures are retryable (no answer, 5xx, a timeout); a server that
the fleet marks down meanwhile is dropped from the publication instead (its restart brings it
to the current weights, ``Publisher.on_restart``). Otherwise the step raises
:class:`WeightSyncError` naming the step and the server, so the run fails with a line that says
where and what.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
from loguru import logger

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import InferenceError, WeightSyncError
from nexrl_async.inference.client.control import ServerControl

BACKOFF_S = 0.2
"""First pause between attempts (doubling, at most ``BACKOFF_MAX_S``)."""
BACKOFF_MAX_S = 5.0
POLL_S = 0.05
"""How often a backoff checks whether its server went down."""

IsUp = Callable[[str], bool]
"""Whether the fleet routes the server at this URL now."""


def backoff_s(attempt: int) -> float:
    return min(BACKOFF_S * 2.0**attempt, BACKOFF_MAX_S)


def _always_up(url: str) -> bool:
    return True


class Targets:
    """What a transport needs of one publication: the servers it addresses (up in the fleet
    and not dropped), the retry window of unanswered servers, and whether the servers keep
    requests across the swap (``in_place``: a load must not ask for a cache flush, which a
    server refuses while requests run)."""

    def __init__(
        self,
        clients: Mapping[str, ServerControl],
        is_up: IsUp = _always_up,
        *,
        window_s: float = 0.0,
        in_place: bool = False,
    ) -> None:
        self.clients = clients
        self._is_up = is_up
        self.window_s = window_s
        self.in_place = in_place
        self.dropped: set[str] = set()

    def up(self, url: str) -> bool:
        return url not in self.dropped and self._is_up(url)

    def live(self) -> dict[str, ServerControl]:
        """The servers still addressed now; drops the ones the fleet marked down."""
        for url in self.clients:
            if url not in self.dropped and not self._is_up(url):
                self.drop(url)
        return {u: c for u, c in self.clients.items() if u not in self.dropped}

    def subset(self, urls: Iterable[str]) -> Targets:
        """The same publication over ``urls`` only (drops are shared both ways)."""
        keep = set(urls)
        sub = Targets(
            {u: c for u, c in self.clients.items() if u in keep},
            self._is_up,
            window_s=self.window_s,
            in_place=self.in_place,
        )
        sub.dropped = self.dropped
        return sub

    def drop(self, url: str) -> None:
        if url not in self.dropped:
            self.dropped.add(url)
            logger.warning("weights: {} is down; it gets the current weights on restart", url)


def retryable(err: BaseException | None) -> bool:
    """A failure that time may cure: no answer, an error status, a timeout (or one caused by
    such a failure); a rejection or a wrong version is not."""
    while err is not None:
        if isinstance(err, TimeoutError) or getattr(err, "retryable", False):
            return True
        err = err.__cause__
    return False


@dataclass
class Attempts:
    """Retry bookkeeping of one step on one server (or one group)."""

    retries: int
    window_s: float
    made: int = 0
    first_failure: float | None = None

    def again(self, err: BaseException) -> bool:
        """Record a failure; whether to try again."""
        self.made += 1
        now = time.monotonic()
        if self.first_failure is None:
            self.first_failure = now
        if self.made <= self.retries:
            return True
        return retryable(err) and now - self.first_failure < self.window_s

    def backoff_s(self) -> float:
        return backoff_s(self.made - 1)


async def sleep_unless_down(seconds: float, targets: Targets, urls: list[str]) -> None:
    """Sleep ``seconds``, or less once one of ``urls`` went down."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not all(targets.up(u) for u in urls):
            return
        await anyio.sleep(min(POLL_S, left))


async def run_step(
    cfg: WeightsConfig,
    step: str,
    url: str,
    call: Callable[[], Awaitable[object]],
    *,
    retries: int | None = None,
    targets: Targets | None = None,
    window_s: float = 0.0,
) -> None:
    """``call()`` under ``cfg.step_timeout_s``, retried on inference errors, weight-sync errors
    and timeouts (see the module docstring); returns early once ``url`` is dropped from
    ``targets``."""
    attempts = Attempts(cfg.retries if retries is None else retries, window_s)
    while True:
        if targets is not None and not targets.up(url):
            return
        try:
            with anyio.fail_after(cfg.step_timeout_s):
                await call()
            return
        except (InferenceError, WeightSyncError, TimeoutError) as err:
            if targets is not None and not targets.up(url):
                targets.drop(url)
                return
            logger.warning(
                "weights {} on {} failed (attempt {}): {}", step, url, attempts.made + 1, err
            )
            if not attempts.again(err):
                raise WeightSyncError(
                    f"weights {step} failed on {url} after {attempts.made} attempts: {err}"
                ) from err
        if targets is None:
            await anyio.sleep(attempts.backoff_s())
        else:
            await sleep_unless_down(attempts.backoff_s(), targets, [url])


async def each_server(
    cfg: WeightsConfig,
    clients: Mapping[str, ServerControl] | Targets,
    step: str,
    call: Callable[[ServerControl], Awaitable[object]],
    *,
    retries: int | None = None,
) -> None:
    """:func:`run_step` on every server (every live one of :class:`Targets`, within its retry
    window) concurrently; the first failure cancels the rest and is raised as itself (not
    inside an exception group)."""
    targets, window_s = (clients, clients.window_s) if isinstance(clients, Targets) else (None, 0.0)
    live = clients.live() if isinstance(clients, Targets) else clients

    async def one(url: str, client: ServerControl) -> None:
        await run_step(
            cfg,
            step,
            url,
            lambda: call(client),
            retries=retries,
            targets=targets,
            window_s=window_s,
        )

    if len(live) == 1:  # no task group: every loop cycle counts on a busy event loop
        await one(*next(iter(live.items())))
        return
    with unwrapped():
        async with anyio.create_task_group() as tg:
            for url, client in live.items():
                tg.start_soon(one, url, client)


@contextmanager
def unwrapped() -> Iterator[None]:
    """Re-raise a task group's failure bare when all of it is :class:`WeightSyncError` (the
    first one); any other exception group passes through untouched."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not leaves or not all(isinstance(e, WeightSyncError) for e in leaves):
            raise
        raise leaves[0] from leaves[0].__cause__


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def best_effort(
    clients: Mapping[str, ServerControl],
    step: str,
    call: Callable[[ServerControl], Awaitable[object]],
    *,
    timeout_s: float,
) -> None:
    """``call`` on every server, shielded and bounded by ``timeout_s``; failures only logged.
    For cleanup after a failure (end a session, leave a group, continue generation)."""

    async def one(url: str, client: ServerControl) -> None:
        try:
            await call(client)
        except (InferenceError, WeightSyncError) as err:
            logger.debug("weights {} on {} (cleanup) failed: {}", step, url, err)

    with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s):
        async with anyio.create_task_group() as tg:
            for url, client in clients.items():
                tg.start_soon(one, url, client)
