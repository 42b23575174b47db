"""The shared-memory transport: local servers copy the weights from one file of this host.

``weights.transport = "shared"`` (the default for ``inference.backend = "local"``). The trainer's
parameters are staged into one shared-memory file (:mod:`~nexrl_async.inference.staging`: the
trainer process fills it, an in-process trainer is copied into the transport's own file); each
live server then gets one ``/update_weights_from_shared_memory`` call and copies every tensor
between two of its decode steps. Nothing is serialised, no group is kept, and no server needs a
pause: the swap is atomic with respect to decoding, so the publisher skips the ``in_place`` hold
(:attr:`SharedTransport.atomic`).

The file is staged and read while holding ``limiter`` (the engine's torch limiter), so no
training step writes over it mid-load. A relaunched server (:meth:`SharedTransport.restore`)
maps the same file; past version 0 it is loaded with the trainer's current parameters, which a
restore between a step and its publication labels with the published version (the publication
that follows replaces them anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anyio
import anyio.to_thread
from loguru import logger

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.inference.client.control import ServerControl
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.inference.staging import Layout, StagingWriter
from nexrl_async.weights.distributed import ParamSource
from nexrl_async.weights.steps import Targets, each_server

Stage = Callable[[], Layout]
"""Blocking: fills the staging file with the trainer's current parameters; its layout."""


def staging_of(params: ParamSource) -> tuple[Stage, Callable[[], None]]:
    """A :data:`Stage` over an in-process trainer's ``named_parameters_for_sync`` (its own file)
    and the callable that closes that file."""
    writer = StagingWriter()
    return (lambda: writer.fill(params())), writer.close


class SharedTransport:
    """``weights.transport = "shared"`` (see the module docstring)."""

    name = "shared"
    atomic = True
    """Every server swaps a whole version between two decode steps: in place needs no hold."""

    def __init__(
        self,
        cfg: WeightsConfig,
        *,
        clients: Mapping[str, ServerControl],
        stage: Stage,
        limiter: anyio.CapacityLimiter | None = None,
        close: Callable[[], None] | None = None,
        staged: Callable[[], Layout | None] | None = None,
    ) -> None:
        """``staged``: the layout the trainer already staged for its current parameters, if
        any, without blocking, in a file no step writes before the step after next (a trainer
        process with ``stage_after_step``); it makes :meth:`capture` possible."""
        self.cfg = cfg
        self.clients = clients
        self.stage = stage
        self.limiter = limiter or anyio.CapacityLimiter(1)
        self._close = close
        self._staged = staged
        self._captured: tuple[int, Layout] | None = None

    def capture(self, version: int) -> bool:
        """Take the trainer's staged layout as ``version`` now (before its next step starts);
        True when there is one: the publication may then run beside the next step."""
        layout = self._staged() if self._staged is not None else None
        self._captured = (version, layout) if layout is not None else None
        return layout is not None

    async def prepare(self, version: int, targets: Targets) -> None:
        return None

    async def transfer(self, version: int, targets: Targets) -> int:
        captured, self._captured = self._captured, None
        if captured is not None and captured[0] == version:  # its file outlives the next step
            await self._load(captured[1], version, targets, "load", in_place=targets.in_place)
            return captured[1].nbytes
        return await self._stage_and_load(version, targets, "load", in_place=targets.in_place)

    async def _stage_and_load(
        self, version: int, servers: Targets | Mapping[str, ServerControl], step: str, *,
        in_place: bool,
    ) -> int:  # fmt: skip
        async with self.limiter:  # no training step writes the file while servers read it
            layout = await anyio.to_thread.run_sync(self.stage)
            await self._load(layout, version, servers, step, in_place=in_place)
        return layout.nbytes

    async def _load(
        self, layout: Layout, version: int, servers: Targets | Mapping[str, ServerControl],
        step: str, *, in_place: bool,
    ) -> None:  # fmt: skip
        deadline = self.cfg.step_timeout_s
        await each_server(
            self.cfg, servers, step,
            lambda c: c.update_weights_from_shared_memory(
                layout, weight_version=version, in_place=in_place, timeout_s=deadline
            ),
        )  # fmt: skip

    def committed(self, version: int) -> None:
        return None

    async def restore(self, server: ServerHandle, version: int) -> None:
        """Past version 0, load the trainer's current parameters into the relaunched server."""
        if version == 0:
            return
        client = {server.url: self.clients[server.url]}
        await self._stage_and_load(version, client, "restore", in_place=False)
        logger.info("restored weights v{} into {}", version, server.url)

    async def aclose(self) -> None:
        if self._close is not None:
            self._close()
