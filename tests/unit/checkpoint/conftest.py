"""Small real objects for checkpoint tests: a tied-embedding module, a trainer, groups, a flow.

The helpers are module-level (tests import them through fixtures: pytest runs with
``--import-mode=importlib``, so this file is not importable by name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from nexrl_async.algorithms import AdaptiveKLController
from nexrl_async.config.pipeline import PoolConfig, StalenessConfig
from nexrl_async.core.records import FailureReason, Group, Status, Trajectory, Turn, VersionToken
from nexrl_async.data.source import RowSource
from nexrl_async.engine.flow import Flow
from nexrl_async.obs.ledger import RunLedger
from nexrl_async.pipeline.pool import TrajectoryPool
from nexrl_async.pipeline.staleness import StalenessGate
from nexrl_async.train.checkpoint import load_trainer, save_trainer

torch.set_num_threads(1)


class TinyLM(torch.nn.Module):
    """Embedding tied to the output head, like the small Qwen2 the recipes build."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, width)
        self.mid = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(ids))))


@dataclass
class FakeTrainer:
    """Has what ``train.checkpoint.CheckpointableTrainer`` and the engine's checkpointer need."""

    model: torch.nn.Module = field(default_factory=TinyLM)
    steps_done: int = 0
    kl_controller: AdaptiveKLController | None = field(
        default_factory=lambda: AdaptiveKLController(0.1, 0.05, 100)
    )
    exported: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = LambdaLR(self.optimizer, lambda s: 1.0 / (1 + s))

    def step(self) -> None:
        loss = self.model(torch.tensor([[1, 2, 3]])).logsumexp(-1).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.steps_done += 1

    def save_hf(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        self.exported.append(path)
        return path

    def save_checkpoint(self, directory: Path) -> Path:
        return save_trainer(self, directory)

    def load_checkpoint(self, directory: Path) -> None:
        load_trainer(self, directory)


def make_group(token: VersionToken, key: str, *, failed: bool = False) -> Group:
    """A finished group of two one-turn samples from the lease's version (rewards 0 and 1)."""
    trajectories = [
        Trajectory(
            group_id=f"g{token.lease_id}",
            item_key=key,
            sample_index=i,
            token=token,
            turns=[Turn(role="assistant", token_ids=[1, 2], loss_mask=[1, 1])],
            reward=float(i),
            status=Status.FAILED if failed else Status.OK,
            failure=FailureReason.TIMEOUT if failed else None,
        )
        for i in range(2)
    ]
    return Group(
        group_id=f"g{token.lease_id}", item_key=key, token=token, trajectories=trajectories
    )


def make_flow(tmp_path: Path, *, rows: int = 40, batch: int = 2, k: int = 1) -> Flow:
    """A flow over a shuffled in-memory source, the same for every call with the same args."""
    gate = StalenessGate(StalenessConfig(max_staleness=k), batch_groups=batch)
    pool = TrajectoryPool(PoolConfig(batch_groups=batch), gate=gate)
    data = RowSource([{"x": i} for i in range(rows)], shuffle=True, seed=7)
    ledger = RunLedger(tmp_path / f"events-{id(gate)}.jsonl")
    return Flow(gate=gate, pool=pool, data=data, ledger=ledger)


TrainerFactory = Callable[..., FakeTrainer]


@pytest.fixture
def new_trainer() -> TrainerFactory:
    """``new_trainer(width=6)``: a fresh :class:`FakeTrainer` (seed it with torch first)."""

    def build(width: int = 6) -> FakeTrainer:
        return FakeTrainer(model=TinyLM(width))

    return build


@pytest.fixture
def new_flow(tmp_path: Path) -> Callable[..., Flow]:
    """``new_flow(rows=40, batch=2, k=1)``: see :func:`make_flow`."""

    def build(**kwargs: int) -> Flow:
        return make_flow(tmp_path, **kwargs)

    return build


@pytest.fixture
def group_of() -> Callable[..., Group]:
    return make_group
