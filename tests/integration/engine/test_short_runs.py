"""The engine end to end on CPU: staleness contract, sync on-policy, metrics, run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.obs.ledger import (
    Admitted,
    Published,
    RunFinished,
    RunStarted,
    Trained,
    TurnGenerated,
    read_events,
)
from nexrl_async.obs.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def trained(run: Path) -> list[Trained]:
    return [e for e in read_events(run / "events.jsonl") if isinstance(e, Trained)]


def test_batch_async_run_keeps_the_staleness_bound(run_small) -> None:
    run = run_small("run.total_steps=4", "staleness.max_staleness=1")
    steps = trained(run)
    assert [e.step for e in steps] == [0, 1, 2, 3]
    for event in steps:
        assert len(event.group_ids) == 4
        assert all(0 <= s <= 1 for s in event.staleness), event
        assert event.staleness == [event.step - h for h in event.head_versions]
    events = read_events(run / "events.jsonl")
    assert isinstance(events[0], RunStarted)
    assert isinstance(events[-1], RunFinished)
    assert events[-1].reason == "completed"
    assert [e.version for e in events if isinstance(e, Published)] == [1, 2, 3, 4]
    # every turn's reported weight version is one the fleet has actually served
    assert {e.weight_version for e in events if isinstance(e, TurnGenerated)} <= {0, 1, 2, 3, 4}
    assert (run / "config.toml").is_file()
    assert (run / "model" / "config.json").is_file()


def test_sync_mode_is_on_policy(run_small) -> None:
    run = run_small('staleness.mode="sync"', "staleness.max_staleness=0")
    steps = trained(run)
    assert steps
    assert all(s == 0 for e in steps for s in e.staleness)
    admitted = [e for e in read_events(run / "events.jsonl") if isinstance(e, Admitted)]
    # generation for step s starts only after version s is loaded: lease versions 0,0,0,0,1,...
    assert [a.version for a in admitted[:8]] == [0] * 4 + [1] * 4


def test_metrics_cover_the_step(run_small) -> None:
    run = run_small()
    rows = read_metrics(run / "metrics.jsonl")
    first = rows[0]
    for key in (
        "rollout/reward_mean",
        "rollout/failed",
        "pipeline/staleness_mean",
        "pipeline/staleness_max",
        "pipeline/gate_wait_s",
        "pool/size",
        "train/loss",
        "train/grad_norm",
        "train/logprob_mismatch",
        "weights/publish_s",
        "timing/step_s",
        "throughput/tokens_per_s",
    ):
        assert key in first, key
    assert first["train/logprob_mismatch"] <= 1e-3
    assert first["rollout/failed"] == 0
