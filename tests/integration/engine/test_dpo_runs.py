"""DPO through the engine: the reverse-digits DPO recipe (ln 2 at step 0, greedy validation
accuracy rising), and a serverless run that validates by held-out preference accuracy."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nexrl_async.config.loader import load_recipe
from nexrl_async.core.errors import ConfigError
from nexrl_async.engine.parts import check_serverless
from nexrl_async.engine.run import run_recipe
from nexrl_async.obs.metrics import read_metrics

DPO = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "dpo.toml"
PREFERENCE_WORKER = '"nexrl_async.rollout.preference_worker:PreferenceWorker"'


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dpo_recipe_starts_at_ln2_and_raises_greedy_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # the recipe as a user runs it, shortened: 50 of its 150 steps, validation at both ends
    argv = [sys.executable, "-m", "nexrl_async", "run", str(DPO), "--output", str(out)]
    for override in ("run.total_steps=50", "validation.every_steps=0", "logging.progress=false"):
        argv += ["--set", override]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=200, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    trained = [row for row in rows if "train/loss" in row]
    assert [row["step"] for row in trained] == list(range(50))
    assert abs(trained[0]["train/loss"] - math.log(2)) < 1e-6
    assert trained[0]["train/pairs"] == 32.0
    assert trained[-1]["train/preference_accuracy"] > 0.8
    # validation generated greedily on the local server and scored the answers
    first, last = (row for row in rows if "val/reward_mean" in row)
    assert first["val/samples"] == last["val/samples"] == 64.0
    assert first["val/reward_mean"] < 0.1  # random weights
    assert last["val/reward_mean"] > first["val/reward_mean"] + 0.3, (first, last)
    assert (out / "final" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_serverless_dpo_validates_by_preference_accuracy(tmp_path: Path) -> None:
    overrides = [
        'inference.backend="none"', f"validation.worker={PREFERENCE_WORKER}",
        "run.total_steps=30", "validation.every_steps=0", "validation.max_items=32",
        "rollout.workers=4", "logging.progress=false", "checkpoint.every_steps=0",
    ]  # fmt: skip
    out = tmp_path / "run"
    assert run_recipe(load_recipe(DPO, overrides), output=out) == "completed"
    rows = read_metrics(out / "metrics.jsonl")
    val = [row for row in rows if "val/preference_accuracy" in row]
    assert len(val) == 2, rows
    first, last = val
    assert first["val/preference_accuracy"] == 0.0  # the policy is the reference: all ties
    assert first["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["val/pairs"] == 32.0
    assert first["val/failed"] == 0.0
    assert last["val/preference_accuracy"] > 0.8, last
    assert last["val/reward_margin"] > 0.5, last
    assert last["val/loss"] < 0.5, last
    assert not list((out / "logs").glob("server*"))  # no server was launched


@pytest.mark.parametrize("generates", [True, False])
def test_a_serverless_run_needs_a_validation_worker_that_never_generates(generates: bool) -> None:
    cfg = load_recipe(DPO, ['inference.backend="none"']).config
    worker: Any = SimpleNamespace(generates=generates)
    if not generates:
        check_serverless(cfg, worker, field="validation.worker", ref=cfg.validation.worker)
        return
    with pytest.raises(ConfigError, match=r"validation.worker = 'nexrl_async.rollout:RolloutW"):
        check_serverless(cfg, worker, field="validation.worker", ref=cfg.validation.worker)
