"""The run's long-lived parts, built in dependency order and torn down in reverse.

:func:`open_parts` yields a :class:`Parts`. Each part is built by one named step that also
applies its own share of a :class:`~nexrl_async.engine.resume.Resume` (the order
``engine.resume`` describes)::

    trainer      build it, load the checkpoint's state              (worker thread)
    model_dir    the HF folder the servers start from: the recipe's model, the built one saved,
                 or the restored policy exported                     (worker thread)
    fleet        servers launched (on the checkpoint's version) or attached; while they start:
    flow         data source, staleness gate, pool; restored state   (worker thread for data)
                 and the validation items; then the start-up heap leaves the GC's view
    publisher    weight transport + state machine, at the checkpoint's version; the fleet's
                 restart hook is bound to it once it exists
    workers      the rollout and validation workers with their user code

Teardown: the publisher's transport, then the trainer's ranks, then the fleet's servers, then
the HTTP pool, each in a shielded scope.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio

from nexrl_async.config.data import source_evaluators
from nexrl_async.config.inference import (
    AttachInference,
    LocalInference,
    NoInference,
    SGLangInference,
    resolve_weights,
)
from nexrl_async.config.model import PretrainedModel
from nexrl_async.config.rollout import RolloutConfig
from nexrl_async.config.schema import RecipeConfig
from nexrl_async.core.errors import ConfigError
from nexrl_async.core.protocols import GroupWorker, PolicyTrainer
from nexrl_async.core.records import DataItem, TrainBatch
from nexrl_async.engine.checkpointer import Checkpointer
from nexrl_async.engine.context import RunContext
from nexrl_async.engine.early_parts import WhileServersStart
from nexrl_async.engine.fleet_generator import FleetGenerator
from nexrl_async.engine.flow import Flow
from nexrl_async.engine.reporting import Reporting
from nexrl_async.engine.resume import (
    Resume,
    restore_trainer,
    resumed_inference,
    serving_folder,
)
from nexrl_async.engine.stats import CountingEvents, StepClock
from nexrl_async.engine.validator import validation_rollout
from nexrl_async.inference.client.backend import GenerationBackend
from nexrl_async.inference.client.control import ServerControl
from nexrl_async.inference.client.http import Http, open_http_pool
from nexrl_async.inference.fleet.backends import open_client
from nexrl_async.inference.fleet.supervisor import Fleet, open_fleet
from nexrl_async.obs.ledger import RunResumed
from nexrl_async.rollout.loading import load_worker
from nexrl_async.train.ranks.remote import RemoteTrainer
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer
from nexrl_async.weights import (
    DiskTransport,
    DistributedTransport,
    Publisher,
    SharedTransport,
    Transport,
    staging_of,
)
from nexrl_async.weights.sender import WeightSender

TrainerFactory = Callable[[TrainerSpec], PolicyTrainer]
"""Builds the trainer from its spec (blocking; runs in a worker thread). The default is
:meth:`Trainer.from_spec`; under torchrun rank 0's distributed handle; benchmarks simulate."""


@dataclass(kw_only=True)
class Parts:
    """Handles of everything the main loop drives."""

    cfg: RecipeConfig
    ctx: RunContext
    trainer: PolicyTrainer
    flow: Flow
    fleet: Fleet
    publisher: Publisher
    generator: FleetGenerator
    events: CountingEvents
    worker: GroupWorker
    val_worker: GroupWorker
    val_items: list[DataItem]
    reporting: Reporting
    checkpointer: Checkpointer
    torch_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))

    async def train_step(
        self, batch: TrainBatch, *, on_sent: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """One trainer step; the loop keeps serving rollouts meanwhile. A trainer process is
        driven from the loop itself (its reply wakes the loop); others run in a worker thread.
        ``on_sent`` is called once the step is under way (the batch sent, or the thread
        about to start)."""
        trainer = self.trainer
        if isinstance(trainer, RemoteTrainer):
            async with self.torch_limiter:
                return await trainer.step_async(batch, on_sent=on_sent)
        if on_sent is not None:
            on_sent()
        result = await anyio.to_thread.run_sync(trainer.step, batch, limiter=self.torch_limiter)
        return dict(result)

    def pipeline_metrics(self, clock: StepClock) -> dict[str, float]:
        """Gate, pool and rollout counters since the last step."""
        flow = self.flow
        out = {**flow.pool.metrics(), **flow.gate.metrics(), **flow.data.metrics()}
        out["pipeline/gate_wait_s"] = clock.delta("gate_wait", flow.gate_wait_s)
        out["rollout/generated_tokens"] = clock.delta("tokens", self.generator.generated_tokens)
        out["rollout/first_turn_requests"] = clock.delta(
            "first_turns", self.generator.first_turn_requests
        )
        out["pipeline/abandoned_items"] = float(flow.abandoned)
        failed = sum(self.events.failed.values())
        out["rollout/failed"] = clock.delta("failed", failed)
        for reason, count in self.events.failed.items():
            out[f"rollout/failed/{reason}"] = float(count)
        return out


@asynccontextmanager
async def open_parts(
    ctx: RunContext,
    *,
    trainer_factory: TrainerFactory | None = None,
    resume: Resume | None = None,
) -> AsyncIterator[Parts]:
    limiter = anyio.CapacityLimiter(1)
    trainer = await _open_trainer(ctx, trainer_factory, resume)
    try:
        model_dir = await anyio.to_thread.run_sync(_serving_model, ctx, trainer, resume)
        early = WhileServersStart(ctx, resume)
        async with (
            open_http_pool() as http,
            _open_fleet(ctx, model_dir, http, resume, while_starting=early) as fleet,
        ):
            flow, val_items = early.flow, early.val_items
            clients = {url: open_client(url, ctx.cfg.inference, http=http) for url in fleet.urls}
            publisher = await _open_publisher(
                ctx, trainer, fleet, clients, flow=flow, model_dir=model_dir, limiter=limiter,
                resume=resume,
            )  # fmt: skip
            try:
                yield _assemble(ctx, trainer, flow, fleet, publisher, clients, val_items, limiter)
            finally:
                with anyio.CancelScope(shield=True):
                    await publisher.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(trainer.shutdown, limiter=limiter)


async def _open_trainer(
    ctx: RunContext, factory: TrainerFactory | None, resume: Resume | None
) -> PolicyTrainer:
    """Build the trainer; on resume, load the checkpoint's state into it."""
    spec = TrainerSpec.from_recipe(ctx.cfg, ctx.base_dir)
    trainer: PolicyTrainer
    if factory is None and spec.trainer.process:
        # spawned from the loop thread: the parent-death signal follows the spawning thread
        shared = resolve_weights(ctx.cfg.weights, ctx.cfg.inference).transport == "shared"
        remote = RemoteTrainer.start(
            spec, log_level=ctx.cfg.logging.level, log_file=ctx.run_dir.logs_dir / "trainer.log",
            stage_after_step=shared,  # each publication reads what its step staged
        )  # fmt: skip
        try:
            await anyio.to_thread.run_sync(remote.wait_ready)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remote.shutdown)
            raise
        trainer = remote
    else:
        trainer = await anyio.to_thread.run_sync(factory or Trainer.from_spec, spec)
    if resume is not None:
        await anyio.to_thread.run_sync(restore_trainer, trainer, resume)
    return trainer


def _serving_model(ctx: RunContext, trainer: PolicyTrainer, resume: Resume | None) -> Path:
    """The HF folder the servers start from (blocking)."""
    if resume is not None:
        return serving_folder(ctx.run_dir.weights_dir, resume, trainer.save_hf)
    if isinstance(ctx.cfg.model, PretrainedModel):
        return Path(ctx.cfg.model.path)
    path = ctx.run_dir.root / "model"
    if not (path / "config.json").exists():
        trainer.save_hf(path)
    return path


def _open_fleet(
    ctx: RunContext, model_dir: Path, http: Http, resume: Resume | None, *,
    while_starting: Callable[[], Awaitable[None]],
) -> AbstractAsyncContextManager[Fleet]:  # fmt: skip
    """The servers; on resume, launched on the checkpoint's weights and version."""
    inference = ctx.cfg.inference
    if resume is not None:
        inference = resumed_inference(inference, model_dir, resume.version)
    return open_fleet(
        inference, model_dir=model_dir, log_dir=ctx.run_dir.logs_dir, http=http,
        while_starting=while_starting,
    )  # fmt: skip


async def _open_publisher(
    ctx: RunContext,
    trainer: PolicyTrainer,
    fleet: Fleet,
    clients: Mapping[str, GenerationBackend],
    *,
    flow: Flow,
    model_dir: Path,
    limiter: anyio.CapacityLimiter,
    resume: Resume | None,
) -> Publisher:
    """The weight publisher, bound as the fleet's restart hook; the flow (the staleness gate)
    owns the version it publishes; on resume, attached servers are loaded with the
    checkpoint's weights."""
    weights = resolve_weights(ctx.cfg.weights, ctx.cfg.inference)
    transport = _transport(ctx, trainer, clients, model_dir=model_dir, limiter=limiter)
    # The publisher calls only the control part every backend has (BackendControl); weights/
    # still names SGLang's ServerControl for it.
    control = cast(Mapping[str, ServerControl], clients)
    publisher = Publisher(weights, fleet=fleet, clients=control, transport=transport, versions=flow)
    fleet.bind(on_restart=publisher.on_restart)
    if resume is not None:  # the flow (the gate) already holds the checkpoint's version
        if isinstance(fleet.cfg, AttachInference):
            for server in fleet.servers:
                await publisher.on_restart(server)
        ctx.ledger.emit(RunResumed(step=resume.step, path=str(resume.path)))
    return publisher


def _transport(
    ctx: RunContext,
    trainer: PolicyTrainer,
    clients: Mapping[str, GenerationBackend],
    *,
    model_dir: Path,
    limiter: anyio.CapacityLimiter,
) -> Transport:
    """The ``weights.transport`` the recipe asks for (``auto`` resolved per backend)."""
    cfg = ctx.cfg
    weights = resolve_weights(cfg.weights, cfg.inference)
    if weights.transport == "disk":
        return DiskTransport(
            weights, clients=clients, weights_dir=ctx.run_dir.weights_dir,
            export=trainer.save_hf, initial_path=model_dir,
        )  # fmt: skip
    sglang = {url: c for url, c in clients.items() if isinstance(c, ServerControl)}
    if len(sglang) < len(clients):  # config.checks refuses this first
        raise ConfigError(
            f'weights.transport = "{weights.transport}": only SGLang-API servers (local, sglang) '
            'take it; use "disk"'
        )
    if weights.transport == "shared":
        if isinstance(trainer, RemoteTrainer):  # the trainer process fills its staging files
            return SharedTransport(
                weights, clients=sglang, stage=trainer.stage_weights, limiter=limiter,
                staged=lambda: trainer.staged,
            )  # fmt: skip
        stage, close = staging_of(trainer.named_parameters_for_sync)
        return SharedTransport(weights, clients=sglang, stage=stage, limiter=limiter, close=close)
    return DistributedTransport(
        weights, clients=sglang, params=trainer.named_parameters_for_sync,
        sender_factory=WeightSender, limiter=limiter,
        backend="nccl" if isinstance(cfg.inference, SGLangInference) else "gloo",
    )  # fmt: skip


def _assemble(
    ctx: RunContext,
    trainer: PolicyTrainer,
    flow: Flow,
    fleet: Fleet,
    publisher: Publisher,
    clients: Mapping[str, GenerationBackend],
    val_items: list[DataItem],
    limiter: anyio.CapacityLimiter,
) -> Parts:
    """The rollout side (generator, workers) and the step's helpers, around the built parts."""
    cfg = ctx.cfg
    generator = FleetGenerator(
        fleet, clients, current_version=lambda: flow.gate.version,
        retries=cfg.inference.retries, seed=cfg.run.seed,
        batch_window_s=cfg.inference.batch_window_ms / 1000,
        server_batch=cfg.inference.max_batch if isinstance(cfg.inference, LocalInference) else None,
    )  # fmt: skip
    events = CountingEvents(ctx.ledger)
    worker, val_worker = _workers(ctx, trainer, generator, events)
    checkpointer = Checkpointer(
        cfg.checkpoint, root=ctx.run_dir.checkpoints_dir, trainer=trainer, flow=flow,
        ledger=ctx.ledger, limiter=limiter, last_step=flow.gate.next_step,
    )  # fmt: skip
    return Parts(
        cfg=cfg, ctx=ctx, trainer=trainer, flow=flow, fleet=fleet, publisher=publisher,
        generator=generator, events=events, val_items=val_items,
        worker=worker, val_worker=val_worker,
        reporting=Reporting.for_run(
            ctx, trainer, limiter, validation_generates=val_worker.generates
        ),
        checkpointer=checkpointer, torch_limiter=limiter,
    )  # fmt: skip


def _workers(
    ctx: RunContext, trainer: PolicyTrainer, generator: FleetGenerator, events: CountingEvents
) -> tuple[GroupWorker, GroupWorker]:
    """The rollout worker and the validation worker (its own tokenizer copy: a fast tokenizer
    must not run in two threads at once)."""
    cfg = ctx.cfg
    train_evaluators = source_evaluators(cfg.data)

    def build(
        section: RolloutConfig, tokenizer: Any, evaluators: dict[str, str], required: list[str]
    ) -> GroupWorker:
        return load_worker(
            section, tokenizer=tokenizer, generator=generator, base_dir=ctx.base_dir,
            required=required, events=events,
            context_length=trainer.context_length, source_evaluators=evaluators,
        )  # fmt: skip

    # the pool's grouping keys are fields every training item must have
    required = list(dict.fromkeys([*cfg.data.required, *cfg.pool.group_by]))
    worker = build(cfg.rollout, trainer.tokenizer, train_evaluators, required)
    check_serverless(cfg, worker)
    val_rollout = validation_rollout(cfg).rollout
    val_worker = build(
        val_rollout, copy.deepcopy(trainer.tokenizer),
        source_evaluators(cfg.validation.data, fallback=train_evaluators),
        list(cfg.data.required),
    )  # fmt: skip
    if cfg.validation.data is not None:
        check_serverless(cfg, val_worker, field="validation.worker", ref=val_rollout.worker)
    return worker, val_worker


def check_serverless(
    cfg: RecipeConfig,
    worker: GroupWorker,
    *,
    field: str = "rollout.worker",
    ref: str | None = None,
) -> None:
    """``inference.backend = "none"`` needs workers that never generate."""
    if isinstance(cfg.inference, NoInference) and worker.generates:
        name = ref or cfg.rollout.worker or "RolloutWorker"
        raise ConfigError(
            f'inference.backend = "none": {field} = {name!r} generates its samples '
            "(set generates = False on a worker that does not, e.g. "
            '"nexrl_async.rollout.sft_worker:SFTWorker")',
            path=field,
        )
