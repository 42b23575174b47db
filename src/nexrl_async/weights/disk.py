"""The disk transport: HF safetensors written by the trainer, loaded by every server.

``prepare`` exports the trainer's weights to ``<weights_dir>/v<version>`` atomically (a
temporary folder renamed into place) while rollouts go on; ``transfer`` asks every live server,
concurrently, for ``/update_weights_from_disk`` of that folder labelled with the version (each
server retried as ``weights.steps`` says; one that goes down is dropped). The servers must see
the same filesystem. The last ``weights.keep_versions`` folders are kept; a relaunched server
reloads the newest one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
import anyio.to_thread

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import WeightSyncError
from nexrl_async.inference.client.backend import BackendControl
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.weights.steps import Targets, each_server, run_step

Exporter = Callable[[Path], object]
"""Writes the current trainer weights as an HF folder at the given path (blocking)."""


class DiskTransport:
    """``weights.transport = "disk"``."""

    name = "disk"
    atomic = False

    def capture(self, version: int) -> bool:
        return False

    def __init__(
        self,
        cfg: WeightsConfig,
        *,
        clients: Mapping[str, BackendControl],
        weights_dir: Path,
        export: Exporter,
        initial_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.clients = clients
        self.weights_dir = weights_dir
        self.export = export
        self.current_path = initial_path
        """The folder every server holds now (the initial model until the first commit)."""
        self._pending: Path | None = None
        self._published: list[Path] = []

    def path(self, version: int) -> Path:
        return self.weights_dir / f"v{version}"

    async def prepare(self, version: int, targets: Targets) -> None:
        """Export the trainer's weights to :meth:`path` (blocking work in a thread)."""
        path = self.path(version)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with anyio.fail_after(self.cfg.step_timeout_s):
                await anyio.to_thread.run_sync(_clear, tmp, path)
                await anyio.to_thread.run_sync(self.export, tmp)
                await anyio.to_thread.run_sync(tmp.rename, path)
        except TimeoutError as err:
            raise WeightSyncError(
                f"weights export to {path} took longer than {self.cfg.step_timeout_s:g} s"
            ) from err
        except OSError as err:
            raise WeightSyncError(f"weights export to {path} failed: {err}") from err
        self._pending = path

    async def transfer(self, version: int, targets: Targets) -> int:
        path = self._pending or self.path(version)
        if not path.is_dir():
            raise WeightSyncError(f"weights folder {path} does not exist (prepare first)")
        flush = not targets.in_place
        await each_server(
            self.cfg, targets, "transfer", lambda c: self._load(c, path, version, flush=flush)
        )
        return await anyio.to_thread.run_sync(_folder_bytes, path)

    def committed(self, version: int) -> None:
        path = self._pending or self.path(version)
        self._pending = None
        self.current_path = path
        self._published.append(path)
        while len(self._published) > self.cfg.keep_versions:
            shutil.rmtree(self._published.pop(0), ignore_errors=True)

    async def restore(self, server: ServerHandle, version: int) -> None:
        path = self.current_path
        if path is None or version == 0:
            return  # a relaunched server starts from the initial model
        client = self.clients[server.url]
        await run_step(self.cfg, "restore", server.url, lambda: self._load(client, path, version))

    async def aclose(self) -> None:
        return None

    async def _load(
        self, client: BackendControl, path: Path, version: int, *, flush: bool = True
    ) -> None:
        await client.update_weights_from_disk(
            str(path), weight_version=version, flush_cache=flush, timeout_s=self.cfg.step_timeout_s
        )


def _clear(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
