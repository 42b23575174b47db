"""Per-step bookkeeping: rollout counters between steps and the metrics of one step."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from nexrl_async.core.records import FailureReason, Status, TrainBatch, Trajectory
from nexrl_async.data import source_of
from nexrl_async.obs.ledger import RunLedger
from nexrl_async.rollout.events import LedgerEvents


class CountingEvents(LedgerEvents):
    """Writes rollout events to the ledger and counts them for the step metrics."""

    def __init__(self, ledger: RunLedger) -> None:
        super().__init__(ledger)
        self.failed: Counter[str] = Counter()
        self.scored_count = 0

    def scored(
        self,
        *,
        group_id: str,
        sample_index: int,
        reward: float,
        status: Status,
        failure: FailureReason | None,
    ) -> None:
        super().scored(
            group_id=group_id,
            sample_index=sample_index,
            reward=reward,
            status=status,
            failure=failure,
        )
        self.scored_count += 1
        if status is Status.FAILED:
            self.failed[str(failure)] += 1


class StepClock:
    """Deltas of monotone counters between consecutive steps."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._time = time.perf_counter()

    def delta(self, name: str, value: float) -> float:
        previous = self._last.get(name, 0.0)
        self._last[name] = value
        return value - previous

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._time = now - self._time, now
        return elapsed


def batch_metrics(batch: TrainBatch) -> dict[str, float]:
    """Rollout metrics of the trained batch: rewards, lengths, turns and tools, staleness, and
    the evaluator's own metrics (:func:`evaluator_metrics`)."""
    trajs = batch.trajectories
    rewards = [t.reward for t in trajs]
    totals = _TurnTotals.of(trajs)  # one pass over the turns: this runs every step on the loop
    out = evaluator_metrics(batch)
    out |= {
        "rollout/reward_mean": sum(rewards) / len(rewards),
        "rollout/reward_max": max(rewards),
        "rollout/response_len_mean": totals.generated / len(trajs),
        "rollout/samples": float(len(trajs)),
    }
    out.update(totals.agent_metrics(len(trajs), "rollout/"))
    out.update(staleness_metrics(batch))
    out.update(source_metrics(batch))
    return out


def source_metrics(batch: TrainBatch) -> dict[str, float]:
    """Per named data source (a mixture's): ``data/<name>/groups`` and ``data/<name>/samples``
    in the batch, and ``data/<name>/reward_mean`` over its samples (docs/data.md)."""
    rewards: dict[str, list[float]] = {}
    groups: Counter[str] = Counter()
    for group in batch.groups:
        name = source_of(group.item_key)
        if name is not None:
            groups[name] += 1
            rewards.setdefault(name, []).extend(group.rewards)
    out: dict[str, float] = {}
    for name, values in rewards.items():
        out[f"data/{name}/groups"] = float(groups[name])
        out[f"data/{name}/samples"] = float(len(values))
        out[f"data/{name}/reward_mean"] = sum(values) / len(values) if values else 0.0
    return out


def evaluator_metrics(batch: TrainBatch) -> dict[str, float]:
    """``rollout/<name>_mean`` for every metric the evaluator returned in ``EvalResult.metrics``
    (the demo's ``exact``): its mean over the batch's samples that report it. Names the engine
    uses itself (``reward``, ``response_len``) are left to the engine's own metrics."""
    sums: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    for traj in batch.trajectories:
        for name, value in traj.metrics.items():
            sums[name] += value
            counts[name] += 1
    return {f"rollout/{name}_mean": sums[name] / counts[name] for name in sorted(sums)}


def agent_metrics(trajs: Sequence[Trajectory], prefix: str) -> dict[str, float]:
    """``<prefix>turns_mean`` (assistant turns per sample) and, when the agent loop ran tool
    calls, ``<prefix>tool_calls_mean`` (per sample) and ``<prefix>tool_success_rate`` (the
    share of calls that ran without error); ``prefix`` is ``"rollout/"`` or ``"val/"``."""
    return _TurnTotals.of(trajs).agent_metrics(len(trajs), prefix)


@dataclass
class _TurnTotals:
    """Sums over every turn of some trajectories, taken in one pass."""

    generated: int = 0
    """Loss-masked (model) tokens: the sum of ``Trajectory.num_generated``."""
    assistant_turns: int = 0
    tool_calls: int = 0
    tool_failures: int = 0

    @classmethod
    def of(cls, trajs: Sequence[Trajectory]) -> _TurnTotals:
        generated = turns = calls = failures = 0
        for traj in trajs:
            for turn in traj.turns:
                generated += sum(turn.loss_mask)
                turns += turn.role == "assistant"
                calls += turn.tool_calls
                failures += turn.tool_failures
        return cls(generated, turns, calls, failures)

    def agent_metrics(self, samples: int, prefix: str) -> dict[str, float]:
        if not samples:
            return {}
        out = {f"{prefix}turns_mean": self.assistant_turns / samples}
        calls = self.tool_calls
        if calls:
            out[f"{prefix}tool_calls_mean"] = calls / samples
            out[f"{prefix}tool_success_rate"] = (calls - self.tool_failures) / calls
        return out


def staleness_metrics(batch: TrainBatch) -> dict[str, float]:
    """``pipeline/staleness_{max,mean}`` of one batch (``step - head_version`` per group)."""
    values = batch.staleness
    if not values:
        return {}
    return {
        "pipeline/staleness_max": float(max(values)),
        "pipeline/staleness_mean": sum(values) / len(values),
    }
