"""The run's long-lived parts, built in dependency order and torn down in reverse.

:func:`open_parts` yields a :class:`Parts`: trainer, data, staleness gate, pool, inference fleet
and clients, weight publisher, rollout workers, validation items, checkpointer. Blocking set-up
(loading the model, reading data) runs in worker threads. Given a :class:`Resume`, the state is
restored on the way, in the order ``engine.resume`` describes.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import msgspec
from loguru import logger

from nexrl_async.config.inference import AttachInference, NoInference, SGLangInference
from nexrl_async.config.model import PretrainedModel
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.core.errors import ConfigError
from nexrl_async.core.records import DataItem, TrainBatch
from nexrl_async.data import iterate_once, open_source
from nexrl_async.engine.checkpointer import Checkpointer
from nexrl_async.engine.context import RunContext
from nexrl_async.engine.fleet_generator import FleetGenerator
from nexrl_async.engine.flow import Flow
from nexrl_async.engine.resume import (
    Resume,
    restore_flow,
    restore_trainer,
    resumed_inference,
    serving_folder,
)
from nexrl_async.engine.samples import write_samples
from nexrl_async.engine.stats import CountingEvents, StepClock
from nexrl_async.engine.validator import LossFn, validation_rollout
from nexrl_async.inference.client.http import open_http_pool
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.inference.fleet.supervisor import Fleet, open_fleet
from nexrl_async.obs.ledger import RunResumed
from nexrl_async.obs.progress import ProgressLine
from nexrl_async.pipeline.pool import TrajectoryPool
from nexrl_async.pipeline.staleness import StalenessGate
from nexrl_async.rollout.loading import load_worker
from nexrl_async.rollout.worker import RolloutWorker
from nexrl_async.train.evaluation import run_validation_loss
from nexrl_async.train.trainer import Trainer
from nexrl_async.weights import DiskTransport, DistributedTransport, Publisher, Transport
from nexrl_async.weights.sender import WeightSender


class TrainerLike(Protocol):
    """What the engine needs of a trainer (``train.Trainer``, a rank-0 handle, a simulation)."""

    tokenizer: Any

    def step(self, batch: TrainBatch) -> Mapping[str, float]: ...

    def save_hf(self, path: str | Path) -> Path: ...


TrainerFactory = Callable[[RecipeConfig, Path], TrainerLike]
"""Builds the trainer from the recipe and its folder (blocking; runs in a worker thread)."""


@dataclass(kw_only=True)
class Parts:
    """Handles of everything the main loop drives."""

    cfg: RecipeConfig
    ctx: RunContext
    trainer: TrainerLike
    flow: Flow
    fleet: Fleet
    publisher: Publisher
    generator: FleetGenerator
    events: CountingEvents
    worker: RolloutWorker
    val_worker: RolloutWorker
    val_items: list[DataItem]
    progress_line: ProgressLine
    checkpointer: Checkpointer
    torch_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))

    async def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One trainer step in a worker thread (the loop keeps serving rollouts)."""
        result = await anyio.to_thread.run_sync(
            self.trainer.step, batch, limiter=self.torch_limiter
        )
        return dict(result)

    def validation_loss(self) -> LossFn | None:
        """SFT validates by the loss of the held-out completions (world size 1 trainers)."""
        if self.cfg.algorithm.mode != "sft":
            return None
        trainer = self.trainer
        if not isinstance(trainer, Trainer):
            logger.warning("val/loss needs a world-size-1 trainer; validation reports rewards")
            return None

        async def loss(batch: TrainBatch) -> dict[str, float]:
            return await run_validation_loss(trainer, batch, limiter=self.torch_limiter)

        return loss

    def pipeline_metrics(self, clock: StepClock) -> dict[str, float]:
        flow = self.flow
        out = {**flow.pool.metrics(), **flow.gate.metrics()}
        out["pipeline/gate_wait_s"] = clock.delta("gate_wait", flow.gate_wait_s)
        out["rollout/generated_tokens"] = clock.delta("tokens", self.generator.generated_tokens)
        out["pipeline/abandoned_items"] = float(flow.abandoned)
        failed = sum(self.events.failed.values())
        out["rollout/failed"] = clock.delta("failed", failed)
        for reason, count in self.events.failed.items():
            out[f"rollout/failed/{reason}"] = float(count)
        return out

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        if self.cfg.algorithm.mode == "sft":  # no rewards and no generated tokens: show the loss
            self.progress_line.update(step, loss=metrics.get("train/loss"))
            return
        self.progress_line.update(
            step,
            reward=metrics.get("rollout/reward_mean"),
            staleness=metrics.get("pipeline/staleness_mean"),
            tokens_per_s=metrics.get("throughput/tokens_per_s"),
        )

    async def dump_samples(self, batch: TrainBatch) -> None:
        every = self.cfg.logging.samples_every_steps
        if every and batch.step % every == 0:
            path = self.ctx.run_dir.samples_dir / f"step_{batch.step:06d}.jsonl"
            await anyio.to_thread.run_sync(write_samples, path, batch, self.trainer.tokenizer)


@asynccontextmanager
async def open_parts(
    ctx: RunContext,
    *,
    trainer_factory: TrainerFactory | None = None,
    resume: Resume | None = None,
) -> AsyncIterator[Parts]:
    cfg, base_dir = ctx.cfg, ctx.base_dir
    factory = trainer_factory or build_trainer
    trainer = await anyio.to_thread.run_sync(factory, cfg, base_dir)
    model_dir = await anyio.to_thread.run_sync(_serving_dir, ctx, trainer, resume)
    inference = cfg.inference
    if resume is not None:
        inference = resumed_inference(inference, model_dir, resume.version)
    data = await anyio.to_thread.run_sync(lambda: open_source(cfg.data, base_dir=base_dir))
    val_items: list[DataItem] = []
    if cfg.validation.data is not None:
        val_data, limit = cfg.validation.data, cfg.validation.max_items
        val_items = await anyio.to_thread.run_sync(lambda: iterate_once(val_data, base_dir, limit))
    gate = StalenessGate(cfg.staleness, batch_groups=cfg.pool.batch_groups)
    # DAPO's dynamic sampling is the pool's zero-variance filter
    zero_var = cfg.pool.filter_zero_variance or cfg.algorithm.dynamic_sampling
    pool = TrajectoryPool(
        msgspec.structs.replace(cfg.pool, filter_zero_variance=zero_var), gate=gate
    )
    flow = Flow(
        gate=gate, pool=pool, data=data, ledger=ctx.ledger, max_replays=cfg.data.max_replays
    )
    if resume is not None:
        restore_flow(flow, resume)
    holder: dict[str, Publisher] = {}

    async def on_restart(server: ServerHandle) -> None:
        if "publisher" in holder:
            await holder["publisher"].on_restart(server)

    async with (
        open_http_pool() as http,
        open_fleet(
            inference, model_dir=model_dir, log_dir=ctx.run_dir.logs_dir, http=http,
            on_restart=on_restart,
        ) as fleet,
    ):  # fmt: skip
        clients = {
            url: SGLangClient.from_config(url, cfg.inference, http=http) for url in fleet.urls
        }
        limiter = anyio.CapacityLimiter(1)
        transport = _transport(ctx, trainer, clients, model_dir=model_dir, limiter=limiter)
        publisher = Publisher(cfg.weights, fleet=fleet, clients=clients, transport=transport)
        holder["publisher"] = publisher
        if resume is not None:
            await _resume_publisher(publisher, fleet, resume)
        generator = FleetGenerator(
            fleet, clients, current_version=lambda: gate.version,
            retries=cfg.inference.retries, seed=cfg.run.seed,
        )  # fmt: skip
        events = CountingEvents(ctx.ledger)
        checkpointer = Checkpointer(
            cfg.checkpoint, root=ctx.run_dir.checkpoints_dir, trainer=trainer,
            export=trainer.save_hf, flow=flow, ledger=ctx.ledger, limiter=limiter,
            last_step=0 if resume is None else resume.step,
        )  # fmt: skip
        if resume is not None:
            ctx.ledger.emit(RunResumed(step=resume.step, path=str(resume.path)))
        common: dict[str, Any] = {
            "tokenizer": trainer.tokenizer, "generator": generator, "base_dir": base_dir,
            "required": list(cfg.data.required), "events": events,
            "context_length": _context_length(trainer),
        }  # fmt: skip
        worker = load_worker(cfg.rollout, **common)
        # its own tokenizer copy: a fast tokenizer must not run in two threads at once
        val_worker = load_worker(
            validation_rollout(cfg).rollout,
            **{**common, "tokenizer": copy.deepcopy(trainer.tokenizer)},
        )
        _check_serverless(cfg, worker)
        parts = Parts(
            cfg=cfg, ctx=ctx, trainer=trainer, flow=flow, fleet=fleet, publisher=publisher,
            generator=generator, events=events, val_items=val_items,
            worker=worker, val_worker=val_worker,
            progress_line=ProgressLine(
                cfg.run.total_steps, terminal=ctx.terminal, enabled=cfg.logging.progress
            ),
            checkpointer=checkpointer, torch_limiter=limiter,
        )  # fmt: skip
        try:
            yield parts
        finally:
            with anyio.CancelScope(shield=True):
                await publisher.aclose()
                await _shutdown(trainer, limiter)


def _transport(
    ctx: RunContext,
    trainer: TrainerLike,
    clients: Mapping[str, SGLangClient],
    *,
    model_dir: Path,
    limiter: anyio.CapacityLimiter,
) -> Transport:
    """The ``weights.transport`` the recipe asks for."""
    cfg = ctx.cfg
    if cfg.weights.transport == "disk":
        return DiskTransport(
            cfg.weights, clients=clients, weights_dir=ctx.run_dir.weights_dir,
            export=trainer.save_hf, initial_path=model_dir,
        )  # fmt: skip
    params: Callable[[], Iterator[Any]] | None = getattr(trainer, "named_parameters_for_sync", None)
    if params is None:
        raise ConfigError(
            'weights.transport = "distributed": this trainer cannot stream its parameters',
            path="weights.transport",
        )
    return DistributedTransport(
        cfg.weights, clients=clients, params=params, sender_factory=WeightSender,
        limiter=limiter, backend="nccl" if isinstance(cfg.inference, SGLangInference) else "gloo",
    )  # fmt: skip


async def _shutdown(trainer: TrainerLike, limiter: anyio.CapacityLimiter) -> None:
    """Release the other ranks of a distributed trainer (they wait for rank 0's commands)."""
    shutdown = getattr(trainer, "shutdown", None)
    if shutdown is not None:
        await anyio.to_thread.run_sync(shutdown, limiter=limiter)


def build_trainer(cfg: RecipeConfig, base_dir: Path) -> Trainer:
    """The world-size-1 trainer the recipe describes."""
    return Trainer.from_config(
        cfg.model, cfg.tokenizer, algorithm=cfg.algorithm, optim=cfg.optim,
        trainer=cfg.trainer, seed=cfg.run.seed, max_new_tokens=cfg.rollout.max_new_tokens,
        total_steps=cfg.run.total_steps, temperature=cfg.rollout.sampling.temperature,
        base_dir=base_dir,
    )  # fmt: skip


def _serving_dir(ctx: RunContext, trainer: TrainerLike, resume: Resume | None) -> Path:
    """The HF folder the servers start from: the recipe's model, or the built one saved.

    On resume: the trainer's state is loaded and its policy exported (``engine.resume``).
    """
    if resume is not None:
        restore_trainer(trainer, resume)
        return serving_folder(ctx.run_dir.weights_dir, resume, trainer.save_hf)
    if isinstance(ctx.cfg.model, PretrainedModel):
        return Path(ctx.cfg.model.path)
    path = ctx.run_dir.root / "model"
    if not (path / "config.json").exists():
        trainer.save_hf(path)
    return path


async def _resume_publisher(publisher: Publisher, fleet: Fleet, resume: Resume) -> None:
    """The publisher starts at the checkpoint's version; attached servers load its weights."""
    publisher.version = resume.version
    if isinstance(fleet.cfg, AttachInference):
        for server in fleet.servers:
            await publisher.on_restart(server)


def _check_serverless(cfg: RecipeConfig, worker: RolloutWorker) -> None:
    """``inference.backend = "none"`` needs a worker that never generates."""
    if isinstance(cfg.inference, NoInference) and getattr(worker, "generates", True):
        name = cfg.rollout.worker or "RolloutWorker"
        raise ConfigError(
            f'inference.backend = "none": rollout.worker = {name!r} generates its samples '
            "(set generates = False on a worker that does not, e.g. "
            '"nexrl_async.rollout.sft_worker:SFTWorker")'
        )


def _context_length(trainer: TrainerLike) -> int | None:
    model = getattr(trainer, "model", None)
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if value else None
