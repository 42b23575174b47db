"""The shipped mixture recipe runs end to end, reports every source in its metrics, and
resumes from a checkpoint to exactly the admission order of a run that never stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nexrl_async.config.loader import load_recipe
from nexrl_async.data import MixtureSource, open_source, source_of
from nexrl_async.engine.checkpointer import list_checkpoints, read_engine_state
from nexrl_async.engine.resume import AdmissionPoint, stitched_admissions
from nexrl_async.engine.run import run_recipe
from nexrl_async.obs import glossary
from nexrl_async.obs.ledger import Admitted, Dropped, Failed, RunStarted, read_events

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "mixture.toml"
GROUPS = 8
SMALL = [
    "rollout.workers=4", "rollout.group_size=4", f"pool.batch_groups={GROUPS}",
    "logging.progress=false", "logging.samples_every_steps=0", "validation.every_steps=0",
    "validation.before_training=false", "checkpoint.every_steps=0",
]  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def metrics_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_run_reports_each_source_and_resumes_exactly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = load_recipe(RECIPE, [*SMALL, "run.total_steps=1", "validation.at_end=false"])
    assert run_recipe(first, output=out) == "completed"
    (_, checkpoint), *_ = list_checkpoints(out / "checkpoints")  # at_end, step 1
    point = AdmissionPoint.of(read_engine_state(checkpoint))
    assert point.leases_issued > GROUPS  # groups were pooled ahead for the next step
    again = load_recipe(RECIPE, [*SMALL, "run.total_steps=3"])
    assert run_recipe(again, output=out, resume="auto") == "completed"

    train = [m for m in metrics_of(out) if "train/loss" in m]
    assert len(train) == 3
    for m in train:
        per_source = [m.get(f"data/{name}/groups", 0.0) for name in ("two", "three")]
        assert sum(per_source) == GROUPS  # every group of the batch counted once
        for name in ("two", "three"):
            if m.get(f"data/{name}/groups"):
                assert 0.0 <= m[f"data/{name}/reward_mean"] <= 1.0
                assert m[f"data/{name}/samples"] == 4 * m[f"data/{name}/groups"]
        assert m["data/two/drawn"] + m["data/three/drawn"] == m["data/draws"]
    assert train[-1]["data/draws"] >= 3 * GROUPS
    named = {key for m in metrics_of(out) for key in m if key not in ("step", "time")}
    assert not [key for key in named if glossary.describe(key) is None]  # all in the glossary
    validated = [m for m in metrics_of(out) if "val/reward_mean" in m]
    assert [(m["val/two/samples"], m["val/three/samples"]) for m in validated] == [(48, 16)]

    events = read_events(out / "events.jsonl")
    starts = [i for i, e in enumerate(events) if isinstance(e, RunStarted)]
    runs = [events[a:b] for a, b in zip(starts, [*starts[1:], len(events)], strict=True)]
    assert len(runs) == 2
    assert not [e for e in events if isinstance(e, Failed | Dropped)]  # nothing replayed
    admitted = [[e for e in run if isinstance(e, Admitted)] for run in runs]
    stitched = stitched_admissions(admitted, [point])
    assert len(stitched) > point.leases_issued  # the resumed process drew new items
    source = open_source(again.config.data, base_dir=again.base_dir)
    assert isinstance(source, MixtureSource)
    uninterrupted = [source.next_item() for _ in range(len(stitched))]
    assert stitched == [item.key for item in uninterrupted if item is not None]
    assert {source_of(key) for key in stitched} == {"two", "three"}
