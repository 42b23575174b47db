"""Validation: the current policy on the recipe's validation items, metrics under ``val/``.

Validation runs the same rollout worker (same user code, same fault boundary) with the
validation sampling settings, outside the staleness gate: its groups are scored, never trained.
It runs while training rollouts keep streaming; the fleet serves both.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Awaitable, Callable

import anyio
import msgspec

from nexrl_async.config.schema import RecipeConfig, ValidationConfig
from nexrl_async.core.protocols import GroupWorker
from nexrl_async.core.records import DataItem, Group, TrainBatch, VersionToken
from nexrl_async.data import source_of
from nexrl_async.engine.stats import agent_metrics

LossFn = Callable[[TrainBatch], Awaitable[dict[str, float]]]
"""Scores a batch of validation groups by the trainer's loss (SFT's ``val/loss``, DPO's
``val/preference_accuracy``)."""


def validation_rollout(cfg: RecipeConfig) -> RecipeConfig:
    """The recipe with ``[rollout]`` adjusted for validation (group size, temperature, and
    ``validation.worker`` when set)."""
    val = cfg.validation
    sampling = msgspec.structs.replace(cfg.rollout.sampling, temperature=val.temperature)
    rollout = msgspec.structs.replace(
        cfg.rollout,
        group_size=val.group_size,
        sampling=sampling,
        worker=val.worker or cfg.rollout.worker,
    )
    return msgspec.structs.replace(cfg, rollout=rollout)


def validation_concurrency(cfg: RecipeConfig) -> int:
    """Validation groups in flight: as many samples as training keeps in flight
    (``rollout.workers`` x ``rollout.group_size``), in groups of ``validation.group_size``. The
    demo's 64 one-sample items then go out as one request, not two waves of 32."""
    return max(1, cfg.rollout.workers * cfg.rollout.group_size // cfg.validation.group_size)


async def validate(
    worker: GroupWorker,
    items: list[DataItem],
    *,
    version: int,
    concurrency: int,
    loss: LossFn | None = None,
    failed_samples: str = "zero",
) -> dict[str, float]:
    """Run every item once and average rewards and evaluator metrics.

    ``loss`` (a worker that does not generate) scores the groups by the trainer instead: SFT's
    ``val/loss`` and ``val/ppl``, DPO's preference accuracy.
    """
    groups: list[Group] = []
    limiter = anyio.CapacityLimiter(concurrency)
    token = VersionToken(lease_id=0, version=version)

    async def one(index: int, item: DataItem) -> None:
        async with limiter:
            groups.append(await worker.run_group(item, token, group_id=f"val{version}-{index}"))

    async with anyio.create_task_group() as tg:
        for index, item in enumerate(items):
            tg.start_soon(one, index, item)
    if loss is not None:
        return {**await loss(TrainBatch(step=version, groups=groups)), **_failed(groups)}
    return summarize(groups, failed_samples=failed_samples)


def _failed(groups: list[Group]) -> dict[str, float]:
    trajs = [t for g in groups for t in g.trajectories]
    return {"val/samples": float(len(trajs)), "val/failed": float(sum(not t.ok for t in trajs))}


def summarize(groups: list[Group], *, failed_samples: str = "zero") -> dict[str, float]:
    """``val/*`` of the validation groups; a FAILED sample scores 0 in every mean under
    ``failed_samples = "zero"`` and is left out under ``"exclude"`` (``validation`` config).
    The groups of each named data source (a mixture's) are also summarised under
    ``val/<source>/*``."""
    out = _summary(groups, "val/", failed_samples)
    by_source: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        if (name := source_of(group.item_key)) is not None:
            by_source[name].append(group)
    for name, named in sorted(by_source.items()):
        out.update(_summary(named, "val/" + name + "/", failed_samples))  # val/<source>/...
    return out


def _summary(groups: list[Group], prefix: str, failed_samples: str) -> dict[str, float]:
    trajs = [t for g in groups for t in g.trajectories]
    ok = [t for t in trajs if t.ok]
    counted = trajs if failed_samples == "zero" else ok
    out: dict[str, float] = {
        f"{prefix}samples": float(len(trajs)),
        f"{prefix}failed": float(len(trajs) - len(ok)),
        f"{prefix}reward_mean": sum(t.reward for t in ok) / len(counted) if counted else math.nan,
    }
    sums: dict[str, float] = defaultdict(float)
    for t in ok:
        for key, value in t.metrics.items():
            sums[key] += value
    for key, total in sums.items():
        out[f"{prefix}{key}_mean"] = total / len(counted)
    out.update(agent_metrics(ok, prefix))
    return out


def due(cfg: ValidationConfig, step: int, *, final: bool) -> bool:
    """Whether validation runs before ``step`` (``final``: the run's last weights)."""
    if cfg.data is None:
        return False
    if final:
        return cfg.at_end
    if step == 0:
        return cfg.before_training
    return cfg.every_steps > 0 and step % cfg.every_steps == 0
