"""The calculator recipe's two stages end to end, shortened: SFT on tool-use demonstrations
exports a model, GRPO with the calc tool in the loop starts from it (README, "Agent RL").

The full recipes' figures (rewards that climb) come from the README commands; this checks the
pipeline: the export is what stage two loads, every sample passes the token-exact check, turns
are reported per step and the run folder holds the conversations and the figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nexrl_async.config.loader import load_recipe
from nexrl_async.engine.run import run_recipe
from nexrl_async.obs.ledger import Scored, read_events
from nexrl_async.obs.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RECIPES = Path(__file__).parents[3] / "recipes" / "calculator"
QUIET = ["logging.progress=false", "logging.samples_every_steps=1"]


def test_sft_then_rl(tmp_path: Path) -> None:
    sft = tmp_path / "sft"
    overrides = [
        "run.total_steps=3",
        "pool.batch_groups=16",
        "validation.every_steps=0",
        "validation.max_items=16",
        *QUIET,
    ]
    assert run_recipe(load_recipe(RECIPES / "sft.toml", overrides), output=sft) == "completed"
    rows = read_metrics(sft / "metrics.jsonl")
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 3
    # demonstrations have one turn (answer) or two (call, answer): both kinds are trained
    assert all(1.0 < r["rollout/turns_mean"] < 2.0 for r in steps)
    assert "val/loss" in rows[-1]
    assert all(r["rollout/failed"] == 0 for r in steps)  # every demonstration token-exact
    assert (sft / "final" / "config.json").is_file()
    text = (sft / "samples" / "step_000000.txt").read_text()
    assert "[tool calc] " in text
    assert "[assistant] <tool_call>" in text

    rl = tmp_path / "rl"
    overrides = [
        f"model.path='{sft / 'final'}'",
        "run.total_steps=2",
        "pool.batch_groups=2",
        "rollout.workers=4",
        "rollout.group_size=4",
        "validation.every_steps=0",
        "validation.max_items=8",
        *QUIET,
    ]
    assert run_recipe(load_recipe(RECIPES / "rl.toml", overrides), output=rl) == "completed"
    rows = read_metrics(rl / "metrics.jsonl")
    steps = [r for r in rows if "rollout/reward_mean" in r]
    assert len(steps) == 2
    assert all(r["rollout/turns_mean"] >= 1.0 for r in steps)
    assert all("rollout/failed/format_error" not in r for r in steps)  # token-exact samples
    scored = [e for e in read_events(rl / "events.jsonl") if isinstance(e, Scored)]
    assert scored
    assert all(e.failure is None for e in scored)
    assert {"val/reward_mean", "val/turns_mean", "val/used_tool_mean"} <= set(rows[0])
    assert (rl / "samples" / "step_000000.txt").read_text().count("## group") == 8
    assert (rl / "plots" / "agent.png").is_file()
    assert (rl / "plots" / "reward.png").is_file()
