"""The watchdog restarts launched servers that stop generating, then stops the run."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from nexrl_async.config.pipeline import FaultsConfig
from nexrl_async.core.errors import InferenceError
from nexrl_async.engine import watchdog

CFG = FaultsConfig(stall_warn_s=2.0, stall_restart_s=4.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fleet_of(*pids: int | None, outstanding: int = 3) -> Any:
    servers = [
        SimpleNamespace(url=f"http://s{i}", outstanding=outstanding, pid=pid)
        for i, pid in enumerate(pids)
    ]
    return SimpleNamespace(servers=servers)


async def drive(fleet: Any, events: Any, clock: Clock, *, steps: int, on_tick: Any = None) -> None:
    async def ticking() -> None:
        for step in range(steps):
            await anyio.sleep(0.001)
            clock.now += 1.0
            if on_tick is not None:
                on_tick(step)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticking)
            await watchdog.run_watchdog(fleet, events, CFG, clock=clock, tick_s=0.001)
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None


async def test_an_attached_server_that_never_finishes_a_sample_stops_the_run() -> None:
    events = SimpleNamespace(scored_count=0)
    with pytest.raises(InferenceError, match=r"http://s0: 3 requests.*do not generate"):
        await drive(fleet_of(None), events, Clock(), steps=1000)


async def test_launched_servers_are_restarted_once_before_the_run_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    killed: list[int] = []
    monkeypatch.setattr(watchdog.os, "killpg", lambda pid, sig: killed.append(pid))
    events = SimpleNamespace(scored_count=0)
    with pytest.raises(InferenceError):
        await drive(fleet_of(101, None), events, Clock(), steps=1000)
    assert killed == [101]


async def test_finishing_samples_keep_it_quiet() -> None:
    events = SimpleNamespace(scored_count=0)

    def progress(step: int) -> None:
        events.scored_count += 1

    with anyio.move_on_after(0.5):
        await drive(fleet_of(None), events, Clock(), steps=10_000, on_tick=progress)


async def test_no_pending_request_is_no_stall() -> None:
    events = SimpleNamespace(scored_count=0)
    with anyio.move_on_after(0.5):
        await drive(fleet_of(None, outstanding=0), events, Clock(), steps=10_000)
