"""The rank protocol: rank 0 broadcasts a command, every rank runs it, every rank reports.

```
rank 0 (DistributedTrainer)             ranks 1..N-1 (run_follower)
  channel.send(TrainStep(batch=...))  ──▶  command = channel.receive()
  execute(trainer, command, hooks)         execute(trainer, command, hooks)   (FSDP2 collectives)
  channel.agree(error)                ◀─▶  channel.agree(error)              (all_gather status)
```

Commands are msgspec structs (a tagged union), sent as length-prefixed msgpack over the gloo
``command`` group; a training batch travels inside as msgpack bytes of its
:class:`~nexrl_async.core.records.TrainBatch`. After every command (and once after the trainers
are built) each rank contributes its :class:`RankStatus` (ok, or the error's type and text) to
an ``all_gather_object`` over the gloo ``control`` group. If any rank failed, *every* rank
raises :class:`RankFailure` (a :class:`TrainError`) naming the failing rank and its error;
followers then leave their loop and rank 0's handle refuses further commands: a failure on one
rank stops all of them.

Nothing waits forever: a rank that fails mid-step leaves the others in a collective until
``trainer.collective_timeout_s``; they then fail too, and the status exchange (whose timeout is
a step plus a collective timeout) picks the *first* real error as the cause: errors that look
like consequences (timeouts, lost peers) rank after the others, then by time. A rank 0 that
dies closes its sockets, so the followers' wait for the next command fails at once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

import msgspec
import torch
import torch.distributed as dist
from torch import Tensor

from nexrl_async.core.errors import TrainError
from nexrl_async.core.process import mark_unsafe_teardown
from nexrl_async.core.records import TrainBatch
from nexrl_async.train.checkpoint import load_trainer, save_trainer
from nexrl_async.train.ranks.topology import ProcessGroups
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

# ---- commands ---------------------------------------------------------------------------------


class TrainStep(msgspec.Struct, frozen=True, tag="train_step"):
    """``Trainer.step`` on the batch (msgpack bytes of a TrainBatch)."""

    batch: bytes


class ComputeLogprobs(msgspec.Struct, frozen=True, tag="compute_logprobs"):
    """``Trainer.compute_logprobs`` on the batch (msgpack bytes of a TrainBatch)."""

    batch: bytes


class ValidationLoss(msgspec.Struct, frozen=True, tag="validation_loss"):
    """``Trainer.validation_loss`` on the batch (msgpack bytes of a TrainBatch)."""

    batch: bytes


class SaveHF(msgspec.Struct, frozen=True, tag="save_hf"):
    """Gather the weights; rank 0 writes the HF folder ``path``."""

    path: str


class SaveCheckpoint(msgspec.Struct, frozen=True, tag="save_checkpoint"):
    """Every rank saves its part of a DCP checkpoint into ``path`` (``RankHooks``)."""

    path: str


class LoadCheckpoint(msgspec.Struct, frozen=True, tag="load_checkpoint"):
    """Every rank loads its part of the DCP checkpoint in ``path`` (``RankHooks``)."""

    path: str


class SyncWeights(msgspec.Struct, frozen=True, tag="sync_weights"):
    """Gather every parameter in turn for a weight transport (``RankHooks.sync_weights``)."""


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    """Followers leave their loop (exit code 0)."""

    reason: str = ""


Command = (
    TrainStep
    | ComputeLogprobs
    | ValidationLoss
    | SaveHF
    | SaveCheckpoint
    | LoadCheckpoint
    | SyncWeights
    | Shutdown
)

_COMMANDS = msgspec.msgpack.Decoder(Command)
_BATCHES = msgspec.msgpack.Decoder(TrainBatch)
_STATUS = msgspec.msgpack.Decoder()
_ENCODER = msgspec.msgpack.Encoder()


def encode_command(command: Command) -> bytes:
    return _ENCODER.encode(command)


def decode_command(data: bytes) -> Command:
    """The command ``data`` encodes; a :class:`TrainError` if it is not one."""
    try:
        return _COMMANDS.decode(data)
    except msgspec.DecodeError as err:
        raise TrainError(f"malformed rank command: {err}") from err


def encode_batch(batch: TrainBatch) -> bytes:
    return _ENCODER.encode(batch)


def decode_batch(data: bytes) -> TrainBatch:
    """The batch ``data`` encodes; a :class:`TrainError` if it is not one."""
    try:
        return _BATCHES.decode(data)
    except msgspec.DecodeError as err:
        raise TrainError(f"malformed train batch in a rank command: {err}") from err


class CommandCalls(ABC):
    """The one-command trainer calls of handles that run commands elsewhere (``handle``: on
    every rank; ``remote``: in a child process); :meth:`_run` sends one, returns its result."""

    @abstractmethod
    def _run(self, command: Command) -> object: ...

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """One training step (see ``Trainer.step``); its metrics."""
        result = self._run(TrainStep(batch=encode_batch(batch)))
        assert isinstance(result, dict)
        return result

    def compute_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Per-token log-probs of every trajectory (see ``Trainer.compute_logprobs``)."""
        result = self._run(ComputeLogprobs(batch=encode_batch(batch)))
        assert isinstance(result, list)
        return result

    def validation_loss(self, batch: TrainBatch) -> dict[str, float]:
        """Held-out metrics, no update (``Trainer.validation_loss``)."""
        result = self._run(ValidationLoss(batch=encode_batch(batch)))
        assert isinstance(result, dict)
        return result

    def save_hf(self, path: str | Path) -> Path:
        """The policy and tokenizer as an HF folder at ``path`` (written atomically)."""
        result = self._run(SaveHF(path=str(path)))
        return result if isinstance(result, Path) else Path(path)

    def save_checkpoint(self, directory: str | Path) -> Path:
        """The trainer's state into ``directory``."""
        self._run(SaveCheckpoint(path=str(directory)))
        return Path(directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote, ``steps_done`` included."""
        self._run(LoadCheckpoint(path=str(directory)))


def describe(command: Command) -> str:
    """A short name for logs and errors (``train_step``, ``save_hf /path``)."""
    tag = type(command).__struct_config__.tag
    path = getattr(command, "path", None)
    return f"{tag} {path}" if path else str(tag)


# ---- status -----------------------------------------------------------------------------------


class RankFailure(TrainError):
    """A command failed on some rank; every rank raises this, naming that rank.

    A collective may have timed out on the way, so the process's gloo state is suspect: making
    one marks native teardown unsafe (:mod:`nexrl_async.core.process`).
    """

    def __init__(self, message: str, *, rank: int) -> None:
        super().__init__(message)
        self.rank = rank
        mark_unsafe_teardown(message)


class RankStatus(msgspec.Struct, frozen=True):
    """One rank's outcome of one command."""

    rank: int
    error: str | None = None
    kind: str | None = None
    secondary: bool = False
    """The error looks like a consequence of another rank's (a timeout, a lost peer)."""
    at: float = 0.0
    """``time.time()`` when the error was recorded."""


_CONSEQUENCES = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def is_secondary(error: BaseException) -> bool:
    """A communication failure (collective timeout, closed connection) rather than a cause."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, dist.DistError):
            return True
        if any(marker in str(seen).lower() for marker in _CONSEQUENCES):
            return True
        seen = seen.__cause__
    return False


def status_of(rank: int, error: BaseException | None) -> RankStatus:
    if error is None:
        return RankStatus(rank=rank)
    return RankStatus(
        rank=rank,
        error=str(error) or repr(error),
        kind=type(error).__name__,
        secondary=is_secondary(error),
        at=time.time(),
    )


def first_failure(statuses: list[RankStatus]) -> RankStatus | None:
    """The failure to report: real errors before consequences, then the earliest, lowest rank."""
    failed = [s for s in statuses if s.error is not None]
    return min(failed, key=lambda s: (s.secondary, s.at, s.rank), default=None)


# ---- channel ----------------------------------------------------------------------------------


class RankChannel:
    """Rank 0's command broadcast and every rank's status exchange (world size > 1)."""

    def __init__(self, groups: ProcessGroups) -> None:
        if groups.control is None or groups.command is None:
            raise TrainError("a rank channel needs process groups (world size > 1)")
        self.groups = groups
        self._control = groups.control
        self._command = groups.command

    @property
    def rank(self) -> int:
        return self.groups.rank

    def send(self, command: Command) -> None:
        """Broadcast ``command`` to every follower (rank 0 only)."""
        if self.rank != 0:
            raise TrainError(f"rank {self.rank} cannot send commands; only rank 0 does")
        data = encode_command(command)
        try:
            header = torch.tensor([len(data)], dtype=torch.int64)
            dist.broadcast(header, group=self._command, group_src=0)
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            dist.broadcast(payload, group=self._command, group_src=0)
        except RuntimeError as err:
            raise RankFailure(
                f"cannot send {describe(command)} to the other ranks: {err}", rank=0
            ) from err

    def receive(self) -> Command:
        """Wait for rank 0's next command (followers).

        Raises:
            RankFailure: rank 0 is gone (its sockets closed) or the wait timed out.
        """
        try:
            header = torch.zeros(1, dtype=torch.int64)
            dist.broadcast(header, group=self._command, group_src=0)
            payload = torch.empty(int(header.item()), dtype=torch.uint8)
            dist.broadcast(payload, group=self._command, group_src=0)
        except RuntimeError as err:
            raise RankFailure(
                f"rank {self.rank} lost rank 0 while waiting for a command: {err}", rank=0
            ) from err
        return decode_command(payload.numpy().tobytes())

    def agree(self, error: BaseException | None, *, what: str) -> None:
        """Exchange this rank's outcome of ``what`` with every rank's.

        Raises:
            RankFailure: some rank failed (the first real failure is named), or the exchange
                itself failed (a rank is gone or never reported).
        """
        gathered: list[Any] = [None] * self.groups.world_size
        mine = _ENCODER.encode(status_of(self.rank, error))
        try:
            dist.all_gather_object(gathered, mine, group=self._control)
        except RuntimeError as err:
            local = f"; this rank's own error: {error}" if error is not None else ""
            raise RankFailure(
                f"{what}: rank {self.rank} lost the other ranks while exchanging status: "
                f"{err}{local}",
                rank=self.rank,
            ) from error or err
        statuses = [msgspec.convert(_STATUS.decode(raw), RankStatus) for raw in gathered]
        cause = first_failure(statuses)
        if cause is None:
            return
        failed = sum(s.error is not None for s in statuses)
        more = f" ({failed} of {len(statuses)} ranks failed)" if failed > 1 else ""
        raise RankFailure(
            f"{what} failed on rank {cause.rank}: {cause.kind}: {cause.error}{more}",
            rank=cause.rank,
        ) from error


# ---- execution --------------------------------------------------------------------------------

CheckpointHook = Callable[[Trainer, Path], object]
"""``(trainer, directory)``: save or load this rank's part of a checkpoint (collective)."""
SyncHook = Callable[[Iterator[tuple[str, Tensor]]], object]
"""Consumes a follower's stream of gathered ``(name, tensor)`` pairs (default: discard)."""


@dataclass(frozen=True)
class RankHooks:
    """What commands that other modules implement do; the same on every rank.

    ``save_checkpoint``/``load_checkpoint`` run on every rank (DCP is collective); by default
    they are ``train.checkpoint.save_trainer``/``load_trainer``. ``sync_weights``
    runs on the followers only (rank 0's stream goes to the caller of
    ``DistributedTrainer.named_parameters_for_sync``); whatever it leaves unread is drained.
    """

    save_checkpoint: CheckpointHook | None = None
    load_checkpoint: CheckpointHook | None = None
    sync_weights: SyncHook | None = None


def execute(trainer: Trainer, command: Command, hooks: RankHooks) -> object:
    """Run ``command`` on this rank's trainer; returns the trainer method's result.

    ``Shutdown`` is the caller's business (it returns None here).
    """
    match command:
        case TrainStep(batch=data):
            return trainer.step(decode_batch(data))
        case ComputeLogprobs(batch=data):
            return trainer.compute_logprobs(decode_batch(data))
        case ValidationLoss(batch=data):
            return trainer.validation_loss(decode_batch(data))
        case SaveHF(path=path):
            return trainer.save_hf(path)
        case SaveCheckpoint(path=path):
            return (hooks.save_checkpoint or save_trainer)(trainer, Path(path))
        case LoadCheckpoint(path=path):
            return (hooks.load_checkpoint or load_trainer)(trainer, Path(path))
        case SyncWeights():
            params = trainer.named_parameters_for_sync()
            try:
                if hooks.sync_weights is not None:
                    hooks.sync_weights(params)
            finally:
                drain(params)
            return None
        case Shutdown():
            return None
    assert_never(command)


def drain(params: Iterator[tuple[str, Tensor]]) -> None:
    """Run the rest of a parameter stream (its gathers are collectives the others wait on)."""
    for _ in params:
        pass


def build_on_every_rank(spec: TrainerSpec, channel: RankChannel) -> Trainer:
    """This rank's trainer, once every rank reported building its own.

    Raises:
        RankFailure: some rank failed to build its trainer (named in the message).
    """
    trainer: Trainer | None = None
    error: Exception | None = None
    try:
        trainer = Trainer.from_spec(spec, groups=channel.groups)
    except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised
        error = err
    channel.agree(error, what="building the trainer")
    assert trainer is not None
    return trainer
