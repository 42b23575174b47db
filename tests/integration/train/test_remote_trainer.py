"""A trainer in its own process (``trainer.process = true``) against one in this process."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch
from tiny_train import TINY

from nexrl_async.config.model import CharTokenizer, PretrainedModel
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.core.children import TRAINER_MODULE, early_child
from nexrl_async.core.errors import TrainError
from nexrl_async.inference.staging import StagingReader
from nexrl_async.train.ranks.remote import RemoteTrainer
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

pytestmark = pytest.mark.timeout(180)

SPEC = TrainerSpec(
    model=TINY,
    tokenizer=CharTokenizer(),
    algorithm=AlgorithmConfig(),
    optim=OptimConfig(lr=1e-2, max_grad_norm=None),
    trainer=TrainerConfig(micro_batch_tokens=16, threads=1, step_timeout_s=60.0),
    seed=0,
    max_new_tokens=8,
)


def started() -> Iterator[RemoteTrainer]:
    trainer = RemoteTrainer.start(SPEC)
    try:
        trainer.wait_ready()
        yield trainer
    finally:
        trainer.shutdown()


@pytest.fixture
def remote() -> Iterator[RemoteTrainer]:
    """A fresh trainer process."""
    yield from started()


@pytest.fixture(scope="module")
def shared() -> Iterator[RemoteTrainer]:
    """One process for the tests that only add steps to it (each spawn imports torch again)."""
    yield from started()


def batches(make_batch, make_traj):
    def group(name: str, rewards: list[float]):
        return [make_traj(name, i, [1, 2, 3], [4 + i, 5], reward=r) for i, r in enumerate(rewards)]

    first = make_batch(group("a", [1.0, 0.0]), group("b", [0.0, 1.0, 0.5]), step=0)
    second = make_batch(group("c", [0.2, 0.9]), step=1)
    return first, second


@pytest.mark.parametrize("from_loop", [False, True])
def test_steps_match_a_trainer_in_this_process(
    remote, make_batch, make_traj, from_loop: bool
) -> None:
    local = Trainer.from_spec(SPEC)
    first, second = batches(make_batch, make_traj)
    assert remote.context_length == local.context_length
    assert remote.tokenizer.encode("123") == local.tokenizer.encode("123")
    for batch in (first, second):
        theirs = anyio.run(remote.step_async, batch) if from_loop else remote.step(batch)
        ours = local.step(batch)
        assert theirs.keys() == ours.keys()
        for key in ("train/loss", "train/grad_norm", "train/entropy"):
            assert theirs[key] == pytest.approx(ours[key], rel=1e-5, abs=1e-7), key
    assert remote.steps_done == local.steps_done == 2
    got = remote.compute_logprobs(first)
    want = local.compute_logprobs(first)
    assert len(got) == len(want)
    for row, expected in zip(got, want, strict=True):
        assert row == pytest.approx(expected, rel=1e-5, abs=1e-6)
    remote_params = dict(remote.named_parameters_for_sync())
    local_params = dict(local.named_parameters_for_sync())
    assert remote_params.keys() == local_params.keys()
    for name, tensor in local_params.items():
        torch.testing.assert_close(remote_params[name], tensor, msg=name)


def test_synced_weights_follow_the_steps(shared, make_batch, make_traj) -> None:
    first, _ = batches(make_batch, make_traj)
    before = {name: t.clone() for name, t in shared.named_parameters_for_sync()}
    shared.step(first)
    after = dict(shared.named_parameters_for_sync())
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_a_step_that_stages_its_weights_spares_the_sync_round_trip(
    make_batch, make_traj, tmp_path: Path
) -> None:
    first, second = batches(make_batch, make_traj)
    trainer = RemoteTrainer.start(SPEC, stage_after_step=True)
    try:
        trainer.wait_ready()
        trainer.step(first)
        commands: list[object] = []
        run = trainer._run
        trainer._run = lambda command: commands.append(command) or run(command)  # type: ignore[method-assign]
        layout = trainer.stage_weights()
        assert commands == []  # the step's reply carried the layout
        staged = dict(StagingReader().views(layout))  # as a server reads it
        trainer.save_checkpoint(tmp_path / "ckpt")  # any other command: the next sync is real
        synced = {n: t.clone() for n, t in trainer.named_parameters_for_sync()}
        assert [type(c).__name__ for c in commands] == ["SaveCheckpoint", "SyncWeights"]
        for name, tensor in synced.items():
            torch.testing.assert_close(staged[name], tensor, msg=name)
        trainer.step(second)
        assert any(not torch.equal(staged[n], t) for n, t in synced.items())  # same file, new step
    finally:
        trainer.shutdown()


def test_an_error_in_the_process_is_raised_here_and_it_keeps_serving(
    shared, make_batch, make_traj
) -> None:
    done = shared.steps_done
    bad = make_batch([make_traj("bad", 0, [1, 2], [10_000, 5], reward=1.0)])
    with pytest.raises(IndexError) as caught:
        shared.step(bad)
    assert any(
        "raised in the trainer process during train_step" in n for n in caught.value.__notes__
    )
    assert shared.steps_done == done
    first, _ = batches(make_batch, make_traj)
    assert "train/loss" in shared.step(first)
    assert shared.steps_done == done + 1


def test_a_killed_process_fails_this_call_and_every_later_one(
    remote, make_batch, make_traj
) -> None:
    first, _ = batches(make_batch, make_traj)
    os.kill(remote.pid, signal.SIGKILL)
    with pytest.raises(TrainError, match=r"trainer process exited \(code -9\) during train_step"):
        remote.step(first)
    with pytest.raises(TrainError, match="stopped earlier"):
        remote.compute_logprobs(first)
    remote.shutdown()  # still fine


def test_a_killed_process_fails_a_step_from_the_loop(remote, make_batch, make_traj) -> None:
    first, _ = batches(make_batch, make_traj)
    os.kill(remote.pid, signal.SIGKILL)
    with pytest.raises(TrainError, match=r"trainer process exited \(code -9\) during train_step"):
        anyio.run(remote.step_async, first)
    with pytest.raises(TrainError, match="stopped earlier"):
        anyio.run(remote.step_async, first)


def test_a_cancelled_step_from_the_loop_still_takes_its_reply(
    shared, make_batch, make_traj
) -> None:
    first, second = batches(make_batch, make_traj)
    done = shared.steps_done

    async def cancelled_then_next() -> dict[str, float]:
        with anyio.move_on_after(0.001) as scope:
            await shared.step_async(first)  # cancelled at once, waits for its reply anyway
        assert scope.cancelled_caught
        assert shared.steps_done == done + 1
        return await shared.step_async(second)  # not answered by the first step's reply

    metrics = anyio.run(cancelled_then_next)
    assert shared.steps_done == done + 2
    assert "train/loss" in metrics


def test_a_step_from_the_loop_past_its_timeout_kills_the_process(make_batch, make_traj) -> None:
    first, _ = batches(make_batch, make_traj)
    trainer = RemoteTrainer.start(SPEC)
    try:
        trainer.wait_ready()
        trainer._timeout_s = 0.001  # no step is that fast
        with pytest.raises(TrainError, match="did not answer train_step within"):
            anyio.run(trainer.step_async, first)
        assert trainer._process.poll() is not None
    finally:
        trainer.shutdown()


def test_a_failed_build_is_raised_by_wait_ready(tmp_path: Path) -> None:
    spec = TrainerSpec(
        model=PretrainedModel(path=str(tmp_path / "missing")),
        tokenizer=None,
        algorithm=AlgorithmConfig(),
        optim=OptimConfig(),
        trainer=TrainerConfig(threads=1),
        max_new_tokens=8,
    )
    trainer = RemoteTrainer.start(spec)
    with pytest.raises(Exception, match="missing") as caught:
        trainer.wait_ready()
    assert any("building the trainer" in n for n in caught.value.__notes__)
    trainer.shutdown()


def test_checkpoints_round_trip_through_the_process(
    shared, make_batch, make_traj, tmp_path: Path
) -> None:
    first, second = batches(make_batch, make_traj)
    shared.step(first)
    done = shared.steps_done
    saved = {name: t.clone() for name, t in shared.named_parameters_for_sync()}
    shared.save_checkpoint(tmp_path / "ckpt")
    shared.step(second)
    assert shared.steps_done == done + 1
    shared.load_checkpoint(tmp_path / "ckpt")
    assert shared.steps_done == done
    for name, tensor in shared.named_parameters_for_sync():
        torch.testing.assert_close(tensor, saved[name], msg=name)
    out = shared.save_hf(tmp_path / "hf")
    assert (out / "config.json").is_file()


def test_shutdown_ends_the_process_and_is_idempotent() -> None:
    trainer = RemoteTrainer.start(SPEC)
    trainer.wait_ready()
    trainer.shutdown()
    trainer.shutdown()
    with pytest.raises(TrainError, match="shut down"):
        trainer.validation_loss(None)  # type: ignore[arg-type]
    with pytest.raises(ProcessLookupError):
        os.kill(trainer.pid, 0)


def test_a_forked_process_is_taken_and_an_untaken_one_is_killed() -> None:
    from nexrl_async.core import children
    from nexrl_async.train.ranks.remote_main import serve_socket

    if not children.can_fork():
        pytest.skip("another thread runs in this test process: the engine would spawn instead")
    with early_child(TRAINER_MODULE, serve_socket, enabled=True):
        (forked,) = children._pool[TRAINER_MODULE]
        trainer = RemoteTrainer.start(SPEC)
        assert trainer.pid == forked.process.pid
        trainer.wait_ready()
        assert trainer.steps_done == 0
        trainer.shutdown()
        assert forked.process.returncode == 0
    with early_child(TRAINER_MODULE, serve_socket, enabled=True):
        (untaken,) = children._pool[TRAINER_MODULE]
    assert untaken.process.returncode is not None  # killed when the block ended
    assert not children._pool[TRAINER_MODULE]
