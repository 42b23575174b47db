"""Weight publication: new trainer weights into every inference server (ARCHITECTURE.md §4).

One publication of version ``v`` is a state machine; every step runs under
``weights.step_timeout_s`` and per-server steps are retried ``weights.retries`` times::

    export   trainer writes HF safetensors to <weights_dir>/v<v> (atomically; rollouts go on)
    hold     drain: stop routing new requests, wait for running ones to finish
             interrupt: stop routing, pause_generation(abort) (partials come back to workers)
    transfer every server: update_weights_from_disk(path, weight_version=v)     (concurrently)
    verify   every server reports weight_version == v
    flush    every server's prefix cache flushed
    continue interrupt: continue_generation; routing resumes (always, in a finally)

A restarted server is brought to the current version by :meth:`WeightPublisher.on_restart`
(the fleet's restart hook) under the same lock, so it never overlaps a publication. A failure
after the retry budget raises :class:`WeightSyncError` naming the server and the step: the run
fails loudly rather than training against stale servers.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import anyio
from loguru import logger
from msgspec import Struct

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import InferenceError, WeightSyncError
from nexrl_async.inference.client import SGLangClient
from nexrl_async.inference.fleet import Fleet
from nexrl_async.inference.router import ServerHandle

Exporter = Callable[[Path], object]
"""Writes the current trainer weights as an HF folder at the given path (blocking)."""


class PublishStats(Struct, frozen=True, kw_only=True):
    """What one publication cost."""

    version: int
    bytes: int
    export_s: float
    pause_s: float
    transfer_s: float
    total_s: float


class WeightPublisher:
    """Publishes trainer weights to the fleet by disk (``weights.transport = "disk"``)."""

    def __init__(
        self,
        cfg: WeightsConfig,
        *,
        fleet: Fleet,
        clients: Mapping[str, SGLangClient],
        weights_dir: Path,
        export: Exporter,
        initial_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.clients = clients
        self.weights_dir = weights_dir
        self.export = export
        self.version = 0
        self.current_path = initial_path
        self._lock = anyio.Lock()
        self._published: list[Path] = []

    async def publish(self, version: int) -> PublishStats:
        """Run the whole state machine for ``version``; return its costs."""
        start = time.perf_counter()
        path = self.weights_dir / f"v{version}"
        export_s = await self._export(path)
        async with self._lock:
            pause_start = time.perf_counter()
            try:
                await self._hold()
                transfer_start = time.perf_counter()
                await self._each_server("transfer", lambda c: self._load(c, path, version))
                transfer_s = time.perf_counter() - transfer_start
                await self._each_server("verify", lambda c: self._verify(c, version))
                await self._each_server("flush", self._flush)
                if self.cfg.inflight == "interrupt":
                    await self._each_server("continue", lambda c: c.continue_generation())
            finally:
                self.fleet.resume_routing()
            pause_s = time.perf_counter() - pause_start
            self.version, self.current_path = version, path
        self._forget_old(path)
        return PublishStats(
            version=version,
            bytes=_folder_bytes(path),
            export_s=export_s,
            pause_s=pause_s,
            transfer_s=transfer_s,
            total_s=time.perf_counter() - start,
        )

    async def on_restart(self, server: ServerHandle) -> None:
        """Fleet restart hook: load the current weights into a relaunched server."""
        async with self._lock:
            path, version = self.current_path, self.version
            if path is None or version == 0:
                return
            client = self.clients[server.url]
            logger.info("reloading weights v{} into restarted {}", version, server.url)
            await self._step("restore", server.url, lambda: self._load(client, path, version))

    async def _export(self, path: Path) -> float:
        start = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        with anyio.fail_after(self.cfg.step_timeout_s):
            await anyio.to_thread.run_sync(self.export, tmp)
        tmp.rename(path)
        return time.perf_counter() - start

    async def _hold(self) -> None:
        self.fleet.pause_routing()
        if self.cfg.inflight == "interrupt":
            await self._each_server("pause", lambda c: c.pause_generation("abort"))
        with anyio.fail_after(self.cfg.step_timeout_s):
            await self.fleet.wait_drained()

    async def _load(self, client: SGLangClient, path: Path, version: int) -> None:
        await client.update_weights_from_disk(
            str(path), weight_version=version, timeout_s=self.cfg.step_timeout_s
        )

    async def _verify(self, client: SGLangClient, version: int) -> None:
        info = await client.model_info(timeout_s=self.cfg.step_timeout_s)
        if info.weight_version_int != version:
            raise WeightSyncError(
                f"{client.base_url} reports weight_version {info.weight_version!r} after "
                f"loading v{version}"
            )

    async def _flush(self, client: SGLangClient) -> None:
        await client.flush_cache(timeout_s=self.cfg.step_timeout_s)

    async def _each_server(
        self, step: str, call: Callable[[SGLangClient], Awaitable[object]]
    ) -> None:
        async with anyio.create_task_group() as tg:
            for url, client in self.clients.items():
                tg.start_soon(self._step, step, url, lambda c=client: call(c))

    async def _step(self, step: str, url: str, call: Callable[[], Awaitable[object]]) -> None:
        """One server's step, under the deadline, retried; WeightSyncError when out of budget."""
        last: BaseException | None = None
        for attempt in range(self.cfg.retries + 1):
            try:
                with anyio.fail_after(self.cfg.step_timeout_s):
                    await call()
                return
            except (InferenceError, WeightSyncError, TimeoutError) as err:
                last = err
                logger.warning(
                    "weights {} on {} failed (attempt {}): {}", step, url, attempt + 1, err
                )
                await anyio.sleep(min(2.0**attempt * 0.2, 5.0))
        raise WeightSyncError(
            f"weights {step} failed on {url} after {self.cfg.retries + 1} attempts: {last}"
        ) from last

    def _forget_old(self, newest: Path) -> None:
        self._published.append(newest)
        while len(self._published) > self.cfg.keep_versions:
            shutil.rmtree(self._published.pop(0), ignore_errors=True)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
