"""Per-server publication steps: a deadline on every call, a bounded retry budget, one error.

A step that still fails after ``retries + 1`` attempts raises :class:`WeightSyncError` naming
the step and the server, so the run fails with a line that says where and what.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager

import anyio
from loguru import logger

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import InferenceError, WeightSyncError
from nexrl_async.inference.client.control import ServerControl

BACKOFF_S = 0.2
"""First pause between attempts (doubling, at most ``BACKOFF_MAX_S``)."""
BACKOFF_MAX_S = 5.0


def backoff_s(attempt: int) -> float:
    return min(BACKOFF_S * 2.0**attempt, BACKOFF_MAX_S)


async def run_step(
    cfg: WeightsConfig,
    step: str,
    url: str,
    call: Callable[[], Awaitable[object]],
    *,
    retries: int | None = None,
) -> None:
    """``call()`` under ``cfg.step_timeout_s``, retried ``retries`` (default ``cfg.retries``)
    times on inference errors, weight-sync errors and timeouts."""
    budget = cfg.retries if retries is None else retries
    last: BaseException | None = None
    for attempt in range(budget + 1):
        try:
            with anyio.fail_after(cfg.step_timeout_s):
                await call()
            return
        except (InferenceError, WeightSyncError, TimeoutError) as err:
            last = err
            logger.warning("weights {} on {} failed (attempt {}): {}", step, url, attempt + 1, err)
            if attempt < budget:
                await anyio.sleep(backoff_s(attempt))
    raise WeightSyncError(
        f"weights {step} failed on {url} after {budget + 1} attempts: {last}"
    ) from last


async def each_server(
    cfg: WeightsConfig,
    clients: Mapping[str, ServerControl],
    step: str,
    call: Callable[[ServerControl], Awaitable[object]],
    *,
    retries: int | None = None,
) -> None:
    """:func:`run_step` on every server concurrently; the first failure cancels the rest and
    is raised as itself (not inside an exception group)."""
    with unwrapped():
        async with anyio.create_task_group() as tg:
            for url, client in clients.items():

                async def one(url: str = url, client: ServerControl = client) -> None:
                    await run_step(cfg, step, url, lambda: call(client), retries=retries)

                tg.start_soon(one)


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
