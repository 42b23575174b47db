"""The seams between layers, as ``typing.Protocol`` s.

Implementations live in the layer that owns them (``data/``, ``rollout/``, ``train/``, ``obs/``);
the engine wires them together knowing only these shapes. When the engine needs to ask an
object what it can do, the answer is a member here, never a ``getattr`` probe.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from nexrl_async.core.records import (
    DataItem,
    EvalResult,
    Group,
    TrainBatch,
    Trajectory,
    VersionToken,
)


@runtime_checkable
class DataSource(Protocol):
    """An endless-or-finite, resumable stream of :class:`DataItem` s."""

    def next_item(self) -> DataItem | None:
        """The next item, or ``None`` once every epoch is exhausted."""
        ...

    def replay(self, item: DataItem) -> None:
        """Hand ``item`` out again before new ones (its group failed or was dropped)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """A msgpack-able cursor; :meth:`load_state_dict` continues exactly from it."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def metrics(self) -> dict[str, float]:
        """Cumulative progress for the step metrics (``data/...``; may be empty)."""
        ...

    @property
    def exhausted(self) -> bool:
        """Every epoch handed out and no replay queued (a later ``replay`` revives it)."""
        ...

    @property
    def pending_replays(self) -> int:
        """Items queued by :meth:`replay`, not yet handed out again."""
        ...


@runtime_checkable
class Evaluator(Protocol):
    """Scores one finished sample. May be sync or async; sync ones run in a worker thread."""

    def evaluate(self, item: DataItem, trajectory: Trajectory) -> EvalResult: ...


@runtime_checkable
class MetricsSink(Protocol):
    """Receives one flat dict of float metrics per step (keys slash-namespaced)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class GroupWorker(Protocol):
    """Turns one leased data item into one scored :class:`Group` (a rollout worker).

    ``nexrl_async.rollout.RolloutWorker`` and its subclasses implement it; a recipe's
    ``rollout.worker`` names one.
    """

    generates: bool
    """Whether it asks inference servers for tokens; ``False`` (the SFT worker) lets a recipe
    run with ``inference.backend = "none"``."""

    async def run_group(self, item: DataItem, token: VersionToken, *, group_id: str) -> Group:
        """Run the group's samples and score them; failures are data (FAILED trajectories)."""
        ...


class PolicyTrainer(Protocol):
    """Everything the engine needs of a trainer; the only place that lists it.

    Implemented by ``nexrl_async.train.Trainer`` (world size 1), rank 0's
    ``nexrl_async.train.ranks.handle.DistributedTrainer`` (every call runs on every rank),
    ``nexrl_async.train.ranks.remote.RemoteTrainer`` (a world-size-1 trainer in a child
    process) and the pipeline benchmark's simulated trainer. Every method blocks (torch work):
    the engine calls them from a worker thread, one at a time, through one
    ``CapacityLimiter(1)``.
    """

    @property
    def tokenizer(self) -> Any:
        """The policy's tokenizer (HF ``PreTrainedTokenizerBase``); rollouts render with it."""
        ...

    @property
    def context_length(self) -> int | None:
        """The model's longest sequence (``max_position_embeddings``), if it has one."""
        ...

    @property
    def steps_done(self) -> int:
        """Training steps taken (restored by :meth:`load_checkpoint`)."""
        ...

    def step(self, batch: TrainBatch) -> Mapping[str, float]:
        """One training step on ``batch``; its ``train/*`` metrics."""
        ...

    def compute_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The policy's log-prob of every token of every trajectory, in batch order."""
        ...

    def validation_loss(self, batch: TrainBatch) -> Mapping[str, float]:
        """Scores held-out groups without an update: ``val/loss``, ``val/ppl`` and ``val/tokens``
        of the loss-masked tokens; DPO: the pairs' ``val/loss`` and ``val/preference_accuracy``."""
        ...

    def save_hf(self, path: str | Path) -> Path:
        """The policy and tokenizer as an HF safetensors folder at ``path`` (atomically)."""
        ...

    def named_parameters_for_sync(self) -> Iterator[tuple[str, Any]]:
        """``(HF name, tensor)`` per parameter, streamed, for weight transports."""
        ...

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Model, optimizer, schedule and controller state into ``directory``."""
        ...

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote (raises ``CheckpointError``)."""
        ...

    def shutdown(self) -> None:
        """Release other ranks and resources; idempotent."""
        ...
