"""Checkpoints of a run: trainer and engine state at a step boundary, written atomically.

Layout (``N`` = steps done; training resumes at step ``N`` with policy version ``N``)::

    <run>/checkpoints/
      step_000040/
        engine.msgpack      EngineState: step, version, gate, pool (its groups), data cursor,
                            items of outstanding leases, in-flight leases, replay counters, RNG
        trainer/            DCP: model + optimizer (``train.checkpoint``)
        trainer_extra.pt    scheduler, steps done, KL controller
      step_000050.tmp/      being written (never read: only ``step_<digits>`` folders count)
    <run>/final/            HF safetensors export of the final policy (``checkpoint.export_hf``)

Atomicity: everything is written into ``step_<N>.tmp/`` and the folder is renamed to
``step_<N>/`` last, so a folder with the final name is complete; a run killed mid-write leaves a
``.tmp`` folder that the next save removes. Old checkpoints are renamed away before they are
deleted (``keep_last``), so a reader never sees a half-deleted one.

When: after every ``every_steps``-th step (the trainer coroutine waits for the save, so the
weights cannot change under it, while rollouts keep streaming), at the end (``at_end``), and
when a graceful stop is requested (SIGTERM with ``on_sigterm``, ``run.max_wall_s``). The
engine state is captured in one synchronous call on the loop thread; the files are written in
a worker thread under the torch limiter.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
from loguru import logger

from nexrl_async.config.training import CheckpointConfig
from nexrl_async.core.errors import CheckpointError
from nexrl_async.core.protocols import PolicyTrainer
from nexrl_async.engine.flow import Flow, FlowState
from nexrl_async.obs.ledger import Checkpointed, RunLedger
from nexrl_async.train.checkpoint import rng_state

ENGINE_FILE = "engine.msgpack"
STATE_FORMAT = 1
_NAME = re.compile(r"^step_(\d+)$")


class EngineState(msgspec.Struct, kw_only=True):
    """The engine's part of a checkpoint (``engine.msgpack``)."""

    format: int
    step: int
    """Steps done: the resumed run trains step ``step`` next."""
    version: int
    """Policy version the fleet served (== ``step``)."""
    flow: FlowState
    rng: dict[str, Any]
    """Python and torch RNG states (``train.checkpoint.rng_state``)."""
    trainer: bool
    """Whether trainer state was saved next to this file."""
    time: float


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / ENGINE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_engine_state(path: Path) -> EngineState:
    """The :class:`EngineState` of the checkpoint folder ``path``."""
    try:
        state = msgspec.msgpack.decode((path / ENGINE_FILE).read_bytes(), type=EngineState)
    except (OSError, msgspec.DecodeError) as err:
        raise CheckpointError(f"cannot read the checkpoint {path}: {err}") from err
    if state.format != STATE_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.format} is not {STATE_FORMAT}")
    return state


def remove_tree(path: Path) -> None:
    """Delete a folder so no reader sees it half-deleted: rename it to a hidden name first."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.deleting-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class Checkpointer:
    """Saves checkpoints into ``root`` on the engine's schedule; see the module docstring.

    Args:
        trainer: writes its own state into the checkpoint (``PolicyTrainer.save_checkpoint``).
        limiter: the engine's torch limiter (no save overlaps a train step).
        last_step: the step whose state needs no checkpoint (0 for a fresh run: the recipe
            rebuilds it; the resumed step after a resume).
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        root: Path,
        trainer: PolicyTrainer,
        flow: Flow,
        ledger: RunLedger,
        limiter: anyio.CapacityLimiter,
        last_step: int = 0,
    ) -> None:
        self.cfg = cfg
        self.root = root
        self.trainer = trainer
        self.flow = flow
        self.ledger = ledger
        self.limiter = limiter
        self.last_step = last_step

    def due(self, step: int) -> bool:
        """Whether the periodic schedule asks for a checkpoint after ``step`` steps."""
        every = self.cfg.every_steps
        return every > 0 and step % every == 0 and step != self.last_step

    async def save(self, step: int) -> Path | None:
        """Checkpoint the state after ``step`` steps; ``None`` if that state is already saved.

        Call it between steps only (the trainer idle, version ``step`` published).
        """
        if step == self.last_step:
            return None
        started = time.perf_counter()
        try:
            flow = self.flow.snapshot()
        except (TypeError, msgspec.EncodeError) as err:
            raise CheckpointError(f"step {step}: the pool cannot be saved: {err}") from err
        state = EngineState(
            format=STATE_FORMAT,
            step=step,
            version=self.flow.gate.version,
            flow=flow,
            rng=rng_state(),
            trainer=True,
            time=time.time(),
        )
        path = await anyio.to_thread.run_sync(self._write, state, limiter=self.limiter)
        self.last_step = step
        self.ledger.emit(Checkpointed(step=step, path=str(path)))
        logger.info("checkpoint {} ({:.1f}s)", path, time.perf_counter() - started)
        return path

    async def export_final(self, path: Path) -> Path | None:
        """``checkpoint.export_hf``: the final policy as an HF folder at ``path``."""
        if not self.cfg.export_hf:
            return None
        await anyio.to_thread.run_sync(self.trainer.save_hf, path, limiter=self.limiter)
        logger.info("final model exported to {}", path)
        return path

    def _write(self, state: EngineState) -> Path:
        final = self.root / checkpoint_name(state.step)
        staging = final.with_name(final.name + ".tmp")
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            self.trainer.save_checkpoint(staging)  # at world size > 1 every rank writes its shards
            _write_synced(staging / ENGINE_FILE, _encode(state))
            remove_tree(final)  # a checkpoint of this step from an abandoned timeline
            os.replace(staging, final)
            _sync_dir(self.root)
        except OSError as err:
            raise CheckpointError(f"cannot write the checkpoint {final}: {err}") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # only left if something failed
        self._prune()
        return final

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints; remove leftovers of killed writes."""
        for path in self.root.iterdir():
            if path.name.endswith(".tmp") or ".deleting-" in path.name:
                shutil.rmtree(path, ignore_errors=True)
        for _, path in list_checkpoints(self.root)[: -self.cfg.keep_last]:
            remove_tree(path)
            logger.debug("old checkpoint {} removed (keep_last = {})", path, self.cfg.keep_last)


def _encode(state: EngineState) -> bytes:
    try:
        return msgspec.msgpack.encode(state)
    except (TypeError, msgspec.EncodeError) as err:
        # e.g. a data item with a field msgpack cannot hold
        raise CheckpointError(f"step {state.step}: cannot encode the engine state: {err}") from err


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
