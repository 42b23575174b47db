"""Routing: least outstanding, stickiness, per-server caps, down servers, pause, failure."""

from __future__ import annotations

import anyio
import pytest

from nexrl_async.core.errors import EngineUnavailable
from nexrl_async.inference.fleet.router import Router, ServerHandle


def make_router(n: int, *, cap: int = 4, up: bool = True, max_sticky_keys: int = 100) -> Router:
    servers = [ServerHandle(i, f"http://s{i}", max_concurrency=cap) for i in range(n)]
    router = Router(servers, max_sticky_keys=max_sticky_keys)
    if up:
        for server in servers:
            router.mark_up(server)
    return router


def test_picks_least_outstanding_available_server() -> None:
    router = make_router(3)
    s0, s1, s2 = router.servers
    s0.outstanding, s1.outstanding, s2.outstanding = 3, 1, 2
    assert router.pick() is s1
    router.mark_down(s1, "test")
    assert router.pick() is s2


def test_no_available_server_picks_none() -> None:
    router = make_router(2, up=False)
    assert router.pick() is None
    assert router.pick("key") is None


def test_ties_go_to_the_server_with_fewest_leases_granted() -> None:
    router = make_router(3)
    router.servers[0].leases = 5
    router.servers[1].leases = 2
    router.servers[2].leases = 2
    assert router.pick().index == 1  # type: ignore[union-attr]


def test_sticky_key_stays_on_its_server() -> None:
    router = make_router(2)
    first = router.pick("g:0")
    assert first is not None
    first.outstanding = 3  # busier than the other, but still has a free slot (cap 4)
    assert router.pick("g:0") is first
    assert router.pick("g:1") is not first  # a new key goes to the least outstanding


def test_sticky_key_moves_when_its_server_goes_down() -> None:
    router = make_router(2)
    first = router.pick("g:0")
    assert first is not None
    router.mark_down(first, "crashed")
    second = router.pick("g:0")
    assert second is not None
    assert second is not first
    router.mark_up(first)
    assert router.pick("g:0") is second  # rebound: it stays on the new server


def test_sticky_key_leaves_a_full_server_only_for_a_free_one() -> None:
    router = make_router(2, cap=2)
    s0, s1 = router.servers
    assert router.pick("g:0") is s0
    s0.outstanding = 2  # full
    s1.outstanding = 1
    assert router.pick("g:0") is s1
    s1.outstanding = 2  # now both full: the key stays where it is
    assert router.pick("g:0") is s1


def test_release_forgets_the_key_and_keys_are_bounded() -> None:
    router = make_router(2, max_sticky_keys=2)
    router.pick("a")
    router.release("a")
    assert router.sticky_server("a") is None
    router.pick("b")
    router.pick("c")
    router.pick("d")
    assert router.sticky_server("b") is None  # oldest forgotten
    assert router.sticky_server("c") is not None
    assert router.sticky_server("d") is not None


async def test_lease_counts_outstanding_and_releases() -> None:
    router = make_router(2)
    async with router.lease("k") as server:
        assert (server.outstanding, server.active, router.active) == (1, 1, 1)
    assert (server.outstanding, server.active, server.leases) == (0, 0, 1)


async def test_sequential_leases_rotate_over_idle_servers() -> None:
    router = make_router(3)
    indices = []
    for _ in range(4):
        async with router.lease() as server:
            indices.append(server.index)
    assert indices == [0, 1, 2, 0]


async def test_cap_is_never_exceeded() -> None:
    router = make_router(2, cap=2)
    running = {0: 0, 1: 0}
    peak = {0: 0, 1: 0}

    async def request() -> None:
        async with router.lease() as server:
            running[server.index] += 1
            peak[server.index] = max(peak[server.index], running[server.index])
            await anyio.sleep(0.01)
            running[server.index] -= 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(request)
    assert peak == {0: 2, 1: 2}
    assert all(server.outstanding == 0 for server in router.servers)


async def test_body_errors_propagate_and_free_the_slot() -> None:
    router = make_router(1, cap=1)
    with pytest.raises(ValueError, match="boom"):
        async with router.lease():
            raise ValueError("boom")
    with anyio.fail_after(1):
        async with router.lease() as server:
            assert server.outstanding == 1


async def test_server_going_down_fails_its_running_lease_at_once() -> None:
    router = make_router(1)
    (server,) = router.servers
    entered = anyio.Event()

    async def hang_on_server() -> None:
        async with router.lease():
            entered.set()
            await anyio.sleep_forever()

    expected = pytest.RaisesExc(EngineUnavailable, match="health checks failed")
    with anyio.fail_after(2), pytest.RaisesGroup(expected):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hang_on_server)
            await entered.wait()
            router.mark_down(server, "3 health checks failed")
    assert server.outstanding == 0


async def test_running_lease_raises_retryable_error() -> None:
    router = make_router(1)
    (server,) = router.servers

    async def request() -> None:
        async with router.lease():
            router.mark_down(server, "process exited with code -9")
            await anyio.sleep_forever()

    with anyio.fail_after(2), pytest.raises(EngineUnavailable) as caught:
        await request()
    assert caught.value.retryable
    assert "inference server 0 (http://s0) went down" in str(caught.value)


async def test_waiting_lease_reroutes_when_its_server_goes_down() -> None:
    router = make_router(2, cap=1, up=False)
    s0, s1 = router.servers
    router.mark_up(s0)
    holding, picked = anyio.Event(), []

    async def hold_until_down() -> None:
        async with router.lease():
            holding.set()
            await anyio.sleep_forever()

    async def hold() -> None:
        with pytest.raises(EngineUnavailable):
            await hold_until_down()

    async def wait_for_slot() -> None:
        async with router.lease() as server:
            picked.append(server.index)

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await holding.wait()
            tg.start_soon(wait_for_slot)
            await anyio.wait_all_tasks_blocked()
            assert s0.outstanding == 2  # one running, one waiting for the slot
            router.mark_up(s1)
            router.mark_down(s0, "crashed")
    assert picked == [1]
    assert s0.outstanding == 0


async def test_pause_holds_new_leases_until_resume() -> None:
    router = make_router(1)
    entered: list[str] = []
    first_running = anyio.Event()
    finish_first = anyio.Event()

    async def first() -> None:
        async with router.lease():
            first_running.set()
            await finish_first.wait()

    async def second() -> None:
        async with router.lease():
            entered.append("second")

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await first_running.wait()
            router.pause()
            tg.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            assert entered == []
            finish_first.set()
            await router.wait_drained()  # the running lease finished; nothing new started
            assert (router.active, entered) == (0, [])
            router.resume()
    assert entered == ["second"]


async def test_failed_router_fails_waiting_and_new_leases() -> None:
    router = make_router(1, up=False)
    errors: list[str] = []

    async def wait_for_server() -> None:
        with pytest.raises(EngineUnavailable) as caught:
            async with router.lease():
                pass
        errors.append(str(caught.value))

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_server)
            await anyio.wait_all_tasks_blocked()
            router.fail("server 0 restart budget spent")
    assert errors == ["inference fleet unavailable: server 0 restart budget spent"]
    with pytest.raises(EngineUnavailable, match="restart budget"):
        await router.wait_all_up()


async def test_cancelled_waiting_lease_leaves_no_count() -> None:
    router = make_router(1, cap=1)
    (server,) = router.servers
    async with router.lease():
        with anyio.move_on_after(0.05) as scope:
            async with router.lease():
                pytest.fail("the only slot is taken")
        assert scope.cancelled_caught
        assert server.outstanding == 1
    assert server.outstanding == 0


async def test_wait_all_up_returns_once_every_server_is_up() -> None:
    router = make_router(2, up=False)
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(router.wait_all_up)
            await anyio.wait_all_tasks_blocked()
            router.mark_up(router.servers[0])
            await anyio.wait_all_tasks_blocked()
            router.mark_up(router.servers[1])
