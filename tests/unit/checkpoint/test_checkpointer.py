"""Checkpoint folders: atomic writes, keep_last, auto discovery, a full save/restore round trip."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from nexrl_async.config.inference import AttachInference, LocalInference, SGLangInference
from nexrl_async.config.training import CheckpointConfig
from nexrl_async.core.errors import CheckpointError, ConfigError
from nexrl_async.data.source import RowSource
from nexrl_async.engine.checkpointer import (
    ENGINE_FILE,
    STATE_FORMAT,
    Checkpointer,
    EngineState,
    list_checkpoints,
    read_engine_state,
)
from nexrl_async.engine.flow import Flow
from nexrl_async.engine.loop import StopRequest
from nexrl_async.engine.resume import (
    Resume,
    abandon_newer,
    find_checkpoint,
    restore_flow,
    restore_trainer,
    resumed_inference,
    serving_folder,
)
from nexrl_async.obs.ledger import Checkpointed, read_events

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FlowFactory = Callable[..., Flow]


def checkpointer(root: Path, flow: Flow, trainer: Any, **cfg: Any) -> Checkpointer:
    return Checkpointer(
        CheckpointConfig(**cfg), root=root, trainer=trainer, flow=flow, ledger=flow.ledger,
        limiter=anyio.CapacityLimiter(1),
    )  # fmt: skip


async def test_save_writes_a_complete_folder_atomically_and_keeps_the_last_ones(
    tmp_path: Path, new_flow: FlowFactory, new_trainer: Callable[..., Any]
) -> None:
    root = tmp_path / "checkpoints"
    flow = new_flow()
    saver = checkpointer(root, flow, new_trainer(), keep_last=2)
    assert await saver.save(0) is None  # the fresh state needs no checkpoint
    killed = root / "step_000009.tmp"  # a write the previous process did not finish
    killed.mkdir(parents=True)
    (killed / ENGINE_FILE).write_bytes(b"")
    (root / "step_000010").mkdir()  # not complete: no engine file
    for step in (1, 2, 3):
        assert await saver.save(step) == root / f"step_{step:06d}"
    assert await saver.save(3) is None
    assert [s for s, _ in list_checkpoints(root)] == [2, 3]
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003", "step_000010"]
    done = root / "step_000003"
    assert {p.name for p in done.iterdir()} == {ENGINE_FILE, "trainer", "trainer_extra.pt"}
    flow.ledger.close()
    events = [e for e in read_events(flow.ledger.path) if isinstance(e, Checkpointed)]
    assert [(e.step, e.path) for e in events] == [
        (s, str(root / f"step_{s:06d}")) for s in (1, 2, 3)
    ]
    assert find_checkpoint(root, "auto") == done


async def test_state_msgpack_cannot_hold_is_a_checkpoint_error(
    tmp_path: Path, new_flow: FlowFactory, new_trainer: Callable[..., Any]
) -> None:
    flow = new_flow()
    flow.data = RowSource([{"x": object()}])
    assert await flow.admit() is not None
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match="cannot encode"):
        await checkpointer(root, flow, new_trainer()).save(1)
    assert os.listdir(root) == []  # nothing half-written is left


def test_periodic_schedule() -> None:
    saver = Checkpointer.__new__(Checkpointer)
    saver.cfg, saver.last_step = CheckpointConfig(every_steps=2), 0
    assert [s for s in range(7) if saver.due(s)] == [2, 4, 6]
    saver.cfg = CheckpointConfig(every_steps=0)
    assert not any(saver.due(s) for s in range(7))


async def test_round_trip_restores_trainer_and_flow(
    tmp_path: Path,
    new_flow: FlowFactory,
    new_trainer: Callable[..., Any],
    group_of: Callable[..., Any],
) -> None:
    torch.manual_seed(0)
    trainer, flow = new_trainer(), new_flow()
    trainer.step()
    tokens = [got for _ in range(3) if (got := await flow.admit()) is not None]
    await flow.put(group_of(tokens[1][0], tokens[1][1].key))
    path = await checkpointer(tmp_path, flow, trainer).save(1)
    assert path is not None

    resume = Resume.load(path)
    assert (resume.step, resume.version, resume.state.flow.in_flight) == (1, 0, [0, 2])
    torch.manual_seed(1)
    fresh_trainer, fresh_flow = new_trainer(), new_flow()
    restore_trainer(fresh_trainer, resume)
    restore_flow(fresh_flow, resume)
    assert fresh_trainer.steps_done == 1
    weights = zip(trainer.model.parameters(), fresh_trainer.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in weights)
    assert fresh_flow.pool.lease_ids() == [1]
    replayed = [await fresh_flow.admit() for _ in range(2)]
    assert [p[1].key for p in replayed if p] == [tokens[0][1].key, tokens[2][1].key]

    skewed = await checkpointer(tmp_path, flow, trainer).save(3)  # the trainer did 1 step
    assert skewed is not None
    with pytest.raises(CheckpointError, match="after 1 steps"):
        restore_trainer(new_trainer(), Resume.load(skewed))


async def test_the_trainer_writes_and_reads_its_own_state(
    tmp_path: Path, new_flow: FlowFactory
) -> None:
    class Simulated:
        """A trainer without weights: its state is a step count in a file of its own."""

        def __init__(self, steps: int = 0) -> None:
            self.steps_done = steps

        def save_hf(self, path: Path) -> Path:
            return path

        def save_checkpoint(self, directory: Path) -> Path:
            (directory / "steps.txt").write_text(str(self.steps_done))
            return directory

        def load_checkpoint(self, directory: Path) -> None:
            self.steps_done = int((directory / "steps.txt").read_text())

    path = await checkpointer(tmp_path, new_flow(), Simulated(2)).save(2)
    assert path is not None
    assert (path / "steps.txt").read_text() == "2"
    assert read_engine_state(path).trainer is True
    fresh = Simulated()
    restore_trainer(fresh, Resume.load(path))  # type: ignore[arg-type]
    assert fresh.steps_done == 2


def test_find_checkpoint_and_abandon_newer(tmp_path: Path) -> None:
    assert find_checkpoint(tmp_path / "missing", "auto") is None
    for step in (2, 4, 6):
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / ENGINE_FILE).write_bytes(b"x")
    assert find_checkpoint(tmp_path, str(tmp_path / "step_000004")) == tmp_path / "step_000004"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path))
    with pytest.raises(CheckpointError):
        read_engine_state(tmp_path / "step_000004")
    abandon_newer(tmp_path, 2)
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "step_000002"
    assert len(list(tmp_path.glob("abandoned-*.step_000006"))) == 1


def test_servers_resume_on_the_checkpoint_weights(
    tmp_path: Path, new_trainer: Callable[..., Any], new_flow: FlowFactory
) -> None:
    local = resumed_inference(LocalInference(extra_args=["--seed", "3"]), tmp_path, 7)
    assert isinstance(local, LocalInference)
    assert local.extra_args == ["--seed", "3", "--weight-version", "7"]
    sglang = resumed_inference(SGLangInference(model_path="/hub/base"), tmp_path, 7)
    assert isinstance(sglang, SGLangInference)
    assert (sglang.model_path, sglang.extra_args) == (str(tmp_path), ["--weight-version", "7"])
    attach = AttachInference(urls=["http://h:1"])
    assert resumed_inference(attach, tmp_path, 7) is attach

    weights = tmp_path / "weights"
    for stale in ("v6", "v8", "v9.tmp"):
        (weights / stale).mkdir(parents=True)
    (weights / "notes").mkdir()
    trainer = new_trainer()
    state = EngineState(
        format=STATE_FORMAT, step=7, version=7, flow=new_flow().snapshot(), rng={},
        trainer=True, time=0.0,
    )  # fmt: skip
    resume = Resume(path=tmp_path, state=state)
    assert serving_folder(weights, resume, trainer.save_hf) == weights / "v7"
    assert sorted(p.name for p in weights.iterdir()) == ["notes", "v7"]
    assert trainer.exported == [weights / "v7"]


async def test_stop_request_interrupts_only_wrapped_waits() -> None:
    stop = StopRequest()
    assert stop.request("early") is False  # nobody listens: the caller cancels instead
    stop.listening = True
    finished = []
    async with anyio.create_task_group() as tg:

        async def waiter() -> None:
            with stop.interruptible():
                await anyio.sleep(30)
            finished.append("interrupted")

        tg.start_soon(waiter)
        await anyio.sleep(0.01)
        assert stop.request("SIGTERM") is True
    assert finished == ["interrupted"]
    assert stop.reason == "SIGTERM"
    with stop.interruptible() as scope:  # a wait that starts after the request ends at once
        await anyio.sleep(30)
    assert scope.cancelled_caught
