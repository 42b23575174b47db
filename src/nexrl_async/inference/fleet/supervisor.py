"""The inference fleet: servers launched (or attached), health-watched, restarted and routed.

::

    async with open_fleet(cfg.inference, model_dir=d, log_dir=run / "logs", http=http) as fleet:
        async with fleet.lease(f"{group_id}:{sample}") as server:
            ...  # request server.url

``open_fleet`` opens its own task group with one supervisor task per server, waits until every
server answers ``GET /health`` (then ``/health_generate``; 404 there counts as healthy), and on
exit (normal, error or cancellation) stops every launched server in shielded scopes: SIGTERM to
the process group, SIGKILL after ``stop_grace_s`` (see ``launch`` for the parent-SIGKILL case).

What each supervisor waits on:
- launched server: its process exit, and a health probe every ``health_interval_s``. Process exit
  or ``HEALTH_FAILURES`` failed probes in a row (not counted while routing is paused: SGLang's
  health generation stalls during a publication) take it out of routing (its running leases raise
  ``EngineUnavailable``), stop it, wait ``restart_backoff_s`` (doubling), launch it again on the
  same port and wait ``health_timeout_s`` for health, then ``on_restart`` (the weight publisher
  reloads current weights) before it is routed again. After ``max_restarts`` restarts the next
  failure fails the fleet: ``EngineUnavailable`` naming the server and its log file.
- attached server: health probes only; a server down for longer than ``health_timeout_s`` fails
  the fleet. Attached servers are never launched, restarted or stopped.
A fleet failure cancels the fleet's task group, so the ``async with`` body is cancelled and
``open_fleet`` raises an ``ExceptionGroup`` holding the ``EngineUnavailable``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import NoReturn

import anyio
import httpx
from anyio.abc import TaskGroup
from loguru import logger

from nexrl_async.config.inference import (
    AttachInference,
    InferenceConfig,
    LaunchedInference,
    NoInference,
)
from nexrl_async.config.tree import tag_of
from nexrl_async.core.errors import ConfigError, EngineUnavailable, NexRLError
from nexrl_async.inference.client.http import Http, as_pool
from nexrl_async.inference.fleet.backends import backend_for
from nexrl_async.inference.fleet.launch import ServerProcess, ServerSpec, build_specs, log_tail
from nexrl_async.inference.fleet.router import Router, ServerHandle

HEALTH_FAILURES = 3
"""Failed health probes in a row that mark a running server down (sgl-router uses 3 too)."""

RestartHook = Callable[[ServerHandle], Awaitable[None]]
"""Called with a relaunched, healthy server before it is routed again (e.g. reload weights)."""


class Fleet:
    """The servers of one run; built and driven by :func:`open_fleet`."""

    def __init__(
        self,
        cfg: InferenceConfig,
        servers: list[ServerHandle],
        *,
        http: Http,
        specs: list[ServerSpec] | None = None,
        on_restart: RestartHook | None = None,
    ) -> None:
        self.cfg = cfg
        self.servers = servers
        self.router = Router(servers)
        self.http = as_pool(http)
        self.specs = specs
        self.on_restart = on_restart
        self.restart_count = 0
        """Restarts of launched servers so far, all servers."""
        self.processes: set[ServerProcess] = set()
        """Server processes running now (a process is removed once it is stopped and reaped)."""
        self._unspawned = {server.index for server in servers} if specs is not None else set()
        self._spawned = anyio.Event()
        if not self._unspawned:
            self._spawned.set()

    def note_spawned(self, index: int) -> None:
        """Server ``index``'s first process was started (or taken warm), or failed to start."""
        self._unspawned.discard(index)
        if not self._unspawned:
            self._spawned.set()

    async def wait_spawned(self) -> None:
        """Wait until every launched server's first process has been started."""
        await self._spawned.wait()

    def bind(self, *, on_restart: RestartHook) -> None:
        """Set the hook a relaunched server goes through before it is routed again (the weight
        publisher, built after the fleet: this is how that cycle is wired)."""
        self.on_restart = on_restart

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def pids(self) -> list[int | None]:
        """Process id per server (``None``: attached, or down between launches)."""
        return [server.pid for server in self.servers]

    def lease(self, key: str | None = None) -> AbstractAsyncContextManager[ServerHandle]:
        """``async with fleet.lease(key) as server``: one request slot; see ``Router.lease``."""
        return self.router.lease(key)

    def stick(self, keys: Iterable[str], server: ServerHandle) -> None:
        """Route later requests of ``keys`` to ``server``; see ``Router.stick``."""
        self.router.stick(keys, server)

    def release(self, key: str) -> None:
        """The trajectory ``key`` ended: forget its server."""
        self.router.release(key)

    def pause_routing(self) -> None:
        """Hold new leases (a weight publication runs); running ones continue."""
        self.router.pause()

    def resume_routing(self) -> None:
        self.router.resume()

    async def wait_healthy(self) -> None:
        """Wait until every server is healthy and routable."""
        await self.router.wait_all_up()

    async def wait_drained(self) -> None:
        """Wait until no lease runs (while routing is paused)."""
        await self.router.wait_drained()

    def cut_running(self, server: ServerHandle, reason: str) -> int:
        """Cancel the leases running on ``server``; it stays routable (``Router.cut_running``)."""
        return self.router.cut_running(server, reason)

    def kill_leftovers(self) -> None:
        """SIGKILL every server process still registered (last resort; supervisors stop them)."""
        for process in list(self.processes):
            process.kill_now()
            self.processes.discard(process)


@asynccontextmanager
async def open_fleet(
    cfg: InferenceConfig,
    *,
    model_dir: Path,
    log_dir: Path,
    http: Http,
    on_restart: RestartHook | None = None,
    while_starting: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[Fleet]:
    """Launch or attach the servers, wait for health, yield the fleet; stop everything on exit.

    ``while_starting``: the caller's own start-up work, awaited once every server process has
    been started and before waiting for their health, so that it overlaps their start.
    """
    fleet = _build(cfg, model_dir=model_dir, log_dir=log_dir, http=http, on_restart=on_restart)
    try:
        async with anyio.create_task_group() as tg:
            _start_supervisors(fleet, tg)
            try:
                if while_starting is not None:
                    await fleet.wait_spawned()
                    await while_starting()
                try:
                    await fleet.wait_healthy()
                except EngineUnavailable:
                    # Only a failing supervisor fails the router, and its own EngineUnavailable
                    # is about to cancel this group: wait for that instead of raising a copy.
                    await anyio.sleep_forever()
                if fleet.servers:
                    logger.info("inference fleet ready: {}", ", ".join(fleet.urls))
                yield fleet
            finally:
                fleet.router.fail("the inference fleet is closed")
                tg.cancel_scope.cancel()  # supervisors stop their servers (shielded)
    finally:
        fleet.kill_leftovers()


def _build(
    cfg: InferenceConfig,
    *,
    model_dir: Path,
    log_dir: Path,
    http: Http,
    on_restart: RestartHook | None,
) -> Fleet:
    cap = cfg.max_concurrency_per_server
    if isinstance(cfg, NoInference):
        return Fleet(cfg, [], http=http, on_restart=on_restart)
    if isinstance(cfg, AttachInference):
        servers = [
            ServerHandle(i, url.rstrip("/"), max_concurrency=cap) for i, url in enumerate(cfg.urls)
        ]
        return Fleet(cfg, servers, http=http, on_restart=on_restart)
    command = backend_for(cfg).command
    if command is None:
        raise ConfigError(f"inference.backend = {tag_of(cfg)!r}: servers are never launched")
    specs = build_specs(cfg, model_dir=model_dir, log_dir=log_dir, command=command)
    servers = [
        ServerHandle(
            spec.index, spec.url, max_concurrency=cap, log_path=spec.log_path, launched=True
        )
        for spec in specs
    ]
    return Fleet(cfg, servers, http=http, specs=specs, on_restart=on_restart)


def _start_supervisors(fleet: Fleet, tg: TaskGroup) -> None:
    for server in fleet.servers:
        supervisor = _Supervisor(fleet, server)
        if fleet.specs is None:
            tg.start_soon(supervisor.run_attached, name=f"attach-{server.index}")
        else:
            spec = fleet.specs[server.index]
            tg.start_soon(supervisor.run_launched, spec, name=f"server-{server.index}")


class _Supervisor:
    """Keeps one server healthy and routable, or fails the fleet."""

    def __init__(self, fleet: Fleet, server: ServerHandle) -> None:
        self.fleet = fleet
        self.server = server
        self.cfg = fleet.cfg
        self.headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        self.probe_timeout_s = max(1.0, 2 * self.cfg.health_interval_s)

    async def run_launched(self, spec: ServerSpec) -> None:
        cfg = self.fleet.cfg
        assert isinstance(cfg, LaunchedInference)  # launched servers only
        attempt = 0
        while True:
            reason = await self._life(spec, attempt, grace_s=cfg.stop_grace_s)
            if attempt >= cfg.max_restarts:
                self._fail(f"failed and its restart budget ({cfg.max_restarts}) is spent: {reason}")
            backoff_s = cfg.restart_backoff_s * 2**attempt
            attempt += 1
            self.server.restarts = attempt
            self.fleet.restart_count += 1
            logger.warning(
                "{} down ({}); restart {}/{} in {:.1f}s",
                self.server.describe(),
                reason,
                attempt,
                cfg.max_restarts,
                backoff_s,
            )
            await anyio.sleep(backoff_s)

    async def run_attached(self) -> None:
        while True:
            if not await self._wait_ready():
                self._fail(f"not healthy within {self.cfg.health_timeout_s}s")
            self.fleet.router.mark_up(self.server)
            logger.info("{} healthy", self.server.describe())
            reason = await self._watch()
            self.fleet.router.mark_down(self.server, reason)
            logger.warning(
                "{} down ({}); waiting up to {}s for it to recover",
                self.server.describe(),
                reason,
                self.cfg.health_timeout_s,
            )

    async def _life(self, spec: ServerSpec, attempt: int, *, grace_s: float) -> str:
        """Launch, serve until the server fails; the reason. The process is stopped on return."""
        try:
            process = await ServerProcess.spawn(spec, attempt=attempt)
        except OSError as err:  # e.g. out of file descriptors: a failed attempt like a crash
            return f"could not start: {err}"
        finally:
            self.fleet.note_spawned(self.server.index)
        self.fleet.processes.add(process)
        self.server.pid = process.pid
        self.server.weight_version = None  # a fresh process holds the launch weights
        try:
            reason = await self._race(process, attempt)
            self.fleet.router.mark_down(self.server, reason)
            return reason
        finally:
            if self.server.available:  # cancelled: the fleet is closing
                self.fleet.router.mark_down(self.server, "stopping")
            await process.stop(grace_s)
            self.fleet.processes.discard(process)
            self.server.pid = None

    async def _race(self, process: ServerProcess, attempt: int) -> str:
        """Whichever comes first: the process exits, or the health supervision gives up."""
        reasons: list[str] = []
        async with anyio.create_task_group() as tg:

            async def on_exit() -> None:
                code = await process.wait()
                reasons.append(f"process exited with code {code}")
                tg.cancel_scope.cancel()

            async def on_health() -> None:
                reasons.append(await self._serve(restarted=attempt > 0))
                tg.cancel_scope.cancel()

            tg.start_soon(on_exit)
            tg.start_soon(on_health)
        return reasons[0]

    async def _serve(self, *, restarted: bool) -> str:
        if not await self._wait_ready():
            return f"not healthy within {self.cfg.health_timeout_s}s"
        hook = self.fleet.on_restart
        if restarted and hook is not None:
            try:
                with anyio.fail_after(self.cfg.health_timeout_s):
                    await hook(self.server)
            except TimeoutError:
                return f"on_restart hook took longer than {self.cfg.health_timeout_s}s"
            except NexRLError as err:
                return f"on_restart hook failed: {err}"
        self.fleet.router.mark_up(self.server)
        logger.info("{} healthy (pid {})", self.server.describe(), self.server.pid)
        return await self._watch()

    async def _wait_ready(self) -> bool:
        """Poll until ``/health`` is 200 and ``/health_generate`` 200 or 404; False at deadline."""
        longest_s = min(self.cfg.health_interval_s, 0.25)
        poll_s = min(0.01, longest_s)  # doubling: a local server is up in ~0.5 s, SGLang in ~30
        with anyio.move_on_after(self.cfg.health_timeout_s):
            while True:
                if await self._status("/health") == 200:
                    if await self._status("/health_generate") in (200, 404):
                        return True
                await anyio.sleep(poll_s)
                poll_s = min(2 * poll_s, longest_s)
        return False

    async def _watch(self) -> str:
        """Probe every ``health_interval_s``; the reason once ``HEALTH_FAILURES`` fail in a row."""
        failures = 0
        while True:
            await anyio.sleep(self.cfg.health_interval_s)
            status = await self._status("/health")
            if status == 200:
                failures = 0
            elif not self.fleet.router.paused:
                failures += 1
                if failures >= HEALTH_FAILURES:
                    last = status or "no answer"
                    return f"{failures} health checks failed in a row (last: {last})"

    async def _status(self, path: str) -> int | None:
        """HTTP status of ``GET path``, ``None`` on a transport error or past the probe deadline."""
        with anyio.move_on_after(self.probe_timeout_s):
            try:
                response = await self.fleet.http.pick().get(
                    self.server.url + path, headers=self.headers, timeout=self.probe_timeout_s
                )
            except httpx.HTTPError:
                return None
            return response.status_code
        return None

    def _fail(self, what: str) -> NoReturn:
        message = f"{self.server.describe()} {what}"
        if self.server.log_path is not None:
            tail = log_tail(self.server.log_path).strip()
            logger.error("{}; last lines of {}:\n{}", message, self.server.log_path, tail)
        self.fleet.router.fail(message)
        raise EngineUnavailable(message)
