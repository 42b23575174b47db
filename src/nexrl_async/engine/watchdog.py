"""The liveness watchdog: servers that answer ``/health`` but never finish a generation.

A health probe says a server is up, not that it generates. The watchdog watches the one thing
that matters, samples finishing (``scored`` events, training and validation alike): while
requests are pending and none has finished for ``faults.stall_warn_s`` it logs what is pending
(once per stall); after ``faults.stall_restart_s`` it kills the launched servers that hold
requests, so their supervisors restart them (the weight publisher restores their weights);
when that does not help either (or the servers are attached, so nothing can be restarted) it
stops the run with :class:`~nexrl_async.core.errors.InferenceError`, exit 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

import anyio
from loguru import logger

from nexrl_async.config.pipeline import FaultsConfig
from nexrl_async.core.errors import InferenceError
from nexrl_async.engine.stats import CountingEvents
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.inference.fleet.supervisor import Fleet


async def run_watchdog(
    fleet: Fleet,
    events: CountingEvents,
    cfg: FaultsConfig,
    *,
    clock: Callable[[], float] = anyio.current_time,
    tick_s: float = 1.0,
) -> None:
    """Watch until cancelled; see the module docstring."""
    seen, since, warned, restarted = events.scored_count, clock(), False, False
    while True:
        await anyio.sleep(tick_s)
        busy = [server for server in fleet.servers if server.outstanding > 0]
        if events.scored_count != seen or not busy:
            seen, since, warned = events.scored_count, clock(), False
            restarted = restarted and not busy
            continue
        stalled_s = clock() - since
        pending = ", ".join(f"{s.url}: {s.outstanding} requests" for s in busy)
        if stalled_s >= cfg.stall_warn_s and not warned:
            warned = True
            logger.warning("no sample completed in {:.0f} s; pending: {}", stalled_s, pending)
        if stalled_s < cfg.stall_restart_s:
            continue
        if not restarted and _restart(busy):
            restarted, since = True, clock()
            continue
        raise InferenceError(
            f"no sample completed in {stalled_s:.0f} s with requests pending ({pending}): "
            "the inference servers answer /health but do not generate (faults.stall_restart_s)"
        )


def _restart(busy: list[ServerHandle]) -> bool:
    """Kill the launched servers among ``busy`` (their supervisors restart them)."""
    launched = [server for server in busy if server.pid is not None]
    for server in launched:
        logger.warning("{} does not generate: restarting it", server.url)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)  # type: ignore[arg-type]
    return bool(launched)
