"""The rank protocol's pieces: command encoding, failure ordering, command execution, rank 0's
handle (against a fake channel) and the lockstep helpers at world size 1."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import msgspec
import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from nexrl_async.config.schema import RecipeConfig
from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.loss import MicroResult
from nexrl_async.train.ranks.commands import (
    Command,
    ComputeLogprobs,
    LoadCheckpoint,
    RankChannel,
    RankFailure,
    RankHooks,
    RankStatus,
    SaveCheckpoint,
    SaveHF,
    Shutdown,
    SyncWeights,
    TrainStep,
    decode_batch,
    decode_command,
    encode_batch,
    encode_command,
    execute,
    first_failure,
    is_secondary,
    status_of,
)
from nexrl_async.train.ranks.handle import DistributedTrainer, make_trainer
from nexrl_async.train.ranks.lockstep import rank_rows
from nexrl_async.train.ranks.topology import ProcessGroups, Topology
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.step import Tally
from nexrl_async.train.trainer import Trainer


@pytest.fixture
def batch(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> TrainBatch:
    return make_batch(
        [
            make_traj("a", 0, [1, 4], [5, 2], reward=1.0, logprobs=[-0.25, -1.5]),
            make_traj("a", 1, [1, 4], [6, 7, 2], reward=0.0),
        ]
    )


# ---- encoding ---------------------------------------------------------------------------------


def test_commands_round_trip(batch: TrainBatch) -> None:
    commands: list[Command] = [
        TrainStep(batch=encode_batch(batch)),
        ComputeLogprobs(batch=encode_batch(batch)),
        SaveHF(path="/runs/x/weights/v1"),
        SaveCheckpoint(path="/ckpt/step_3"),
        LoadCheckpoint(path="/ckpt/step_3"),
        SyncWeights(),
        Shutdown(reason="done"),
    ]
    for command in commands:
        assert decode_command(encode_command(command)) == command
    step = decode_command(encode_command(commands[0]))
    assert isinstance(step, TrainStep)
    assert decode_batch(step.batch) == batch


def test_malformed_commands_and_batches_are_train_errors() -> None:
    with pytest.raises(TrainError, match="malformed rank command"):
        decode_command(b"\x93garbage")
    with pytest.raises(TrainError, match="malformed train batch"):
        decode_batch(encode_command(Shutdown()))


# ---- failure ordering -------------------------------------------------------------------------


def test_real_errors_rank_before_timeouts_then_by_time() -> None:
    ok = RankStatus(rank=0)
    timeout = RankStatus(rank=0, error="Timed out", kind="RuntimeError", secondary=True, at=1.0)
    late = RankStatus(rank=1, error="boom", kind="ValueError", at=5.0)
    early = RankStatus(rank=2, error="bang", kind="KeyError", at=3.0)
    assert first_failure([ok, RankStatus(rank=1)]) is None
    assert first_failure([timeout, late]) == late
    assert first_failure([timeout, late, early]) == early
    assert first_failure([timeout]) == timeout


def test_communication_failures_are_secondary() -> None:
    assert is_secondary(RuntimeError("[gloo] Timed out waiting 3000ms for recv operation"))
    assert is_secondary(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    assert is_secondary(dist.DistBackendError("nccl watchdog"))
    wrapped = TrainError("step 0: failed")
    wrapped.__cause__ = RuntimeError("Connection reset by peer")
    assert is_secondary(wrapped)
    assert not is_secondary(ValueError("prepare_batch returned a list"))


def test_status_of_records_the_error() -> None:
    assert status_of(2, None) == RankStatus(rank=2)
    status = status_of(1, ValueError("bad shape"))
    assert (status.rank, status.error, status.kind, status.secondary) == (
        1,
        "bad shape",
        "ValueError",
        False,
    )
    assert status.at > 0


# ---- execution --------------------------------------------------------------------------------


class FakeTrainer:
    """Records calls; ``named_parameters_for_sync`` counts how far it was consumed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.gathered = 0

    def step(self, batch: TrainBatch) -> dict[str, float]:
        self.calls.append(("step", batch))
        return {"train/loss": 1.5}

    def compute_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        self.calls.append(("logprobs", batch))
        return [[0.0, -1.0]]

    def save_hf(self, path: str) -> Path:
        self.calls.append(("save_hf", path))
        return Path(path)

    def named_parameters_for_sync(self) -> Iterator[tuple[str, Tensor]]:
        for i in range(4):
            self.gathered += 1
            yield f"p{i}", torch.full((2,), float(i))


def _run(fake: FakeTrainer, command: Command, hooks: RankHooks | None = None) -> object:
    return execute(cast(Trainer, fake), command, hooks or RankHooks())


def test_commands_call_the_trainer(batch: TrainBatch) -> None:
    fake = FakeTrainer()
    assert _run(fake, TrainStep(batch=encode_batch(batch))) == {"train/loss": 1.5}
    assert _run(fake, ComputeLogprobs(batch=encode_batch(batch))) == [[0.0, -1.0]]
    assert _run(fake, SaveHF(path="/w/v1")) == Path("/w/v1")
    assert _run(fake, Shutdown()) is None
    assert fake.calls == [("step", batch), ("logprobs", batch), ("save_hf", "/w/v1")]


def test_checkpoint_commands_call_their_hooks() -> None:
    # (the default hooks, train.checkpoint's DCP functions, run in the distributed tests)
    fake = FakeTrainer()
    seen: list[tuple[str, Path]] = []
    hooks = RankHooks(
        save_checkpoint=lambda trainer, path: seen.append(("save", path)),
        load_checkpoint=lambda trainer, path: seen.append(("load", path)),
    )
    _run(fake, SaveCheckpoint(path="/c/2"), hooks)
    _run(fake, LoadCheckpoint(path="/c/2"), hooks)
    assert seen == [("save", Path("/c/2")), ("load", Path("/c/2"))]
    assert fake.calls == []


def test_a_sync_hook_that_stops_early_still_gathers_everything() -> None:
    fake = FakeTrainer()
    taken: list[str] = []

    def take_one(params: Iterator[tuple[str, Tensor]]) -> None:
        taken.append(next(params)[0])

    _run(fake, SyncWeights(), RankHooks(sync_weights=take_one))
    assert taken == ["p0"]
    assert fake.gathered == 4  # the other ranks' gathers all happened

    def fail(params: Iterator[tuple[str, Tensor]]) -> None:
        next(params)
        raise OSError("transport down")

    failing = FakeTrainer()
    with pytest.raises(OSError, match="transport down"):
        _run(failing, SyncWeights(), RankHooks(sync_weights=fail))
    assert failing.gathered == 4
    plain = FakeTrainer()
    _run(plain, SyncWeights())
    assert plain.gathered == 4


# ---- rank 0's handle --------------------------------------------------------------------------


class FakeChannel:
    """A channel whose status exchange fails on demand (as if another rank had failed)."""

    def __init__(self) -> None:
        self.groups = ProcessGroups(
            topology=Topology(rank=0, world_size=2, local_world_size=2),
            device=torch.device("cpu"),
        )
        self.sent: list[Command] = []
        self.agreed: list[tuple[str, BaseException | None]] = []
        self.fail_next: str | None = None

    def send(self, command: Command) -> None:
        self.sent.append(command)

    def agree(self, error: BaseException | None, *, what: str) -> None:
        self.agreed.append((what, error))
        if error is not None:
            raise RankFailure(f"{what} failed on rank 0: {error}", rank=0) from error
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise RankFailure(f"{what} failed on rank 1: {message}", rank=1)


def _handle() -> tuple[DistributedTrainer, FakeTrainer, FakeChannel]:
    fake, channel = FakeTrainer(), FakeChannel()
    fake.tokenizer = "tok"  # type: ignore[attr-defined]
    for name in ("model", "optimizer", "scheduler"):
        setattr(fake, name, name)
    handle = DistributedTrainer(cast(Trainer, fake), cast(RankChannel, channel), busy_timeout_s=0.2)
    return handle, fake, channel


def test_each_call_sends_its_command_then_exchanges_status(batch: TrainBatch) -> None:
    handle, _, channel = _handle()
    assert handle.step(batch) == {"train/loss": 1.5}
    assert handle.save_hf("/w/v2") == Path("/w/v2")
    assert [type(c) for c in channel.sent] == [TrainStep, SaveHF]
    assert channel.agreed == [("train_step", None), ("save_hf /w/v2", None)]
    assert handle.tokenizer == "tok"


def test_after_a_failure_nothing_is_sent_and_every_call_fails(batch: TrainBatch) -> None:
    handle, _, channel = _handle()
    channel.fail_next = "UserCodeError: boom"
    with pytest.raises(RankFailure, match="rank 1: UserCodeError: boom") as failure:
        handle.step(batch)
    assert failure.value.rank == 1
    with pytest.raises(TrainError, match="stopped after a failure"):
        handle.save_hf("/w/v3")
    handle.shutdown()  # the followers are gone: nothing to tell them
    assert [type(c) for c in channel.sent] == [TrainStep]


def test_shutdown_is_sent_once() -> None:
    handle, _, channel = _handle()
    handle.shutdown("done")
    handle.shutdown("again")
    assert channel.sent == [Shutdown(reason="done")]
    with pytest.raises(TrainError, match="shut down"):
        handle.save_hf("/w/v4")


def test_a_weight_sync_closed_early_drains_and_reports() -> None:
    handle, fake, channel = _handle()
    stream = handle.named_parameters_for_sync()
    assert channel.sent == []  # nothing happens before the first item is asked for
    name, tensor = next(stream)
    assert name == "p0"
    assert torch.equal(tensor, torch.zeros(2))
    with pytest.raises(TrainError, match="stayed busy"):  # it waited, then gave up
        handle.save_hf("/w/v5")
    stream.close()
    assert fake.gathered == 4
    assert channel.agreed == [("sync_weights", None)]
    assert handle.save_hf("/w/v5") == Path("/w/v5")


def _recipe() -> RecipeConfig:
    return msgspec.convert(
        {
            "model": {"kind": "build", "hidden_size": 16, "intermediate_size": 32},
            "tokenizer": {"kind": "chars"},
            "data": {"kind": "jsonl", "path": "unused.jsonl"},
            "rollout": {"evaluator": "unused.py:Evaluator"},
            "trainer": {"device": "cpu", "threads": 1},
        },
        RecipeConfig,
    )


def test_world_size_one_gets_a_plain_trainer(tmp_path: Path) -> None:
    groups = ProcessGroups(topology=Topology(), device=torch.device("cpu"))
    trainer = make_trainer(TrainerSpec.from_recipe(_recipe(), tmp_path), groups)
    assert type(trainer) is Trainer
    assert not trainer.groups.distributed


def test_make_trainer_is_rank_0s() -> None:
    groups = ProcessGroups(
        topology=Topology(rank=1, world_size=2, local_rank=1, local_world_size=2),
        device=torch.device("cpu"),
    )
    with pytest.raises(TrainError, match="rank 1 runs run_follower"):
        make_trainer(TrainerSpec.from_recipe(_recipe(), Path(".")), groups)


# ---- a real channel at world size 1 -----------------------------------------------------------


@pytest.mark.distributed
def test_a_gloo_channel_broadcasts_and_reports(tmp_path: Path, batch: TrainBatch) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        groups = ProcessGroups(
            topology=Topology(),
            device=torch.device("cpu"),
            control=dist.new_group(backend="gloo"),
            command=dist.new_group(backend="gloo"),
        )
        channel = RankChannel(groups)
        command = TrainStep(batch=encode_batch(batch))
        channel.send(command)
        channel.agree(None, what="train_step")
        with pytest.raises(RankFailure, match="save_hf /x failed on rank 0: OSError: disk full"):
            channel.agree(OSError("disk full"), what="save_hf /x")
    finally:
        dist.destroy_process_group()


def test_a_channel_needs_process_groups() -> None:
    with pytest.raises(TrainError, match="world size > 1"):
        RankChannel(ProcessGroups(topology=Topology(), device=torch.device("cpu")))


# ---- lockstep helpers -------------------------------------------------------------------------


def test_rank_rows_split_a_minibatch_by_tokens() -> None:
    lengths = torch.tensor([3, 9, 4, 2, 8])
    assert rank_rows(lengths, [0, 2, 3], 0, 1) == [0, 2, 3]
    shares = [rank_rows(lengths, [1, 2, 3, 4], rank, 2) for rank in range(2)]
    assert shares == [[1, 3], [2, 4]]


def test_a_filler_only_registers_its_metric_keys() -> None:
    tally = Tally()
    result = MicroResult(
        loss=torch.tensor(2.0),
        sums={"pg_loss": 2.0},
        means={"clip_frac": 0.5, "ratio_max": 3.0},
        tokens=4.0,
    )
    tally.add_micro(result, real=False)
    assert tally.sums == {"loss": 0.0, "pg_loss": 0.0}
    assert tally.weighted == {"clip_frac": 0.0}
    assert tally.maxima == {"ratio_max": -math.inf}
    assert tally.tokens == 0.0
    tally.add_micro(result)
    tally.reduce()  # world size 1: unchanged
    assert tally.sums == {"loss": 2.0, "pg_loss": 2.0}
    assert tally.maxima == {"ratio_max": 3.0}
    assert tally.tokens == 4.0
