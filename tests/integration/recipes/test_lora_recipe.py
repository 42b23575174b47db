"""The LoRA recipe end to end: local server subprocess, merged weights published, adapters
checkpointed, a resume, the final export.

Two short in-process runs of ``recipes/reverse_digits/lora.toml`` on-policy
(``staleness.mode = "sync"``): the server generates step ``s`` with version ``s``, so the
trainer's log-probs (peft forward) and the server's (merged weights it was sent) must agree at
every step, the check that publication sends ``W + s B A``. The first run publishes through
the disk transport and checkpoints at its end; the second resumes from that checkpoint and
publishes by broadcast (``weights.transport = "distributed"``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader

from nexrl_async.config.loader import load_recipe
from nexrl_async.engine.run import run_recipe
from nexrl_async.obs.ledger import Published, RunResumed, read_events
from nexrl_async.obs.metrics import read_metrics
from nexrl_async.train.checkpoint import MODEL_DIR
from nexrl_async.train.lora import ADAPTER_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "lora.toml"
SMALL = [
    "rollout.workers=4",
    "rollout.group_size=4",
    "pool.batch_groups=4",
    'staleness.mode="sync"',
    "staleness.max_staleness=0",
    "optim.lr=0.05",  # adapters move far in a step: unmerged weights would show in the mismatch
    "logging.progress=false",
    "logging.samples_every_steps=0",
    "validation.every_steps=0",
    "validation.before_training=false",
    "validation.at_end=false",
    "checkpoint.every_steps=0",
]
MISMATCH = 1e-4
"""Trainer vs server log-probs of the same weights differ by float rounding only."""


def train_rows(run: Path) -> list[dict[str, float]]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]


def test_lora_recipe_publishes_merged_weights_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = load_recipe(RECIPE, [*SMALL, "run.total_steps=3", 'weights.transport="disk"'])
    assert run_recipe(first, output=out) == "completed"
    rows = train_rows(out)
    assert len(rows) == 3
    for row in rows:
        assert row["train/params_trainable_frac"] < 0.1
        assert row["train/logprob_mismatch"] <= MISMATCH, row
    assert [e.transport for e in read_events(out / "events.jsonl") if isinstance(e, Published)] == [
        "disk"
    ] * 3

    checkpoint = out / "checkpoints" / "step_000003"
    saved = FileSystemReader(checkpoint / MODEL_DIR).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys
    assert all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    final = out / "final"
    assert (final / ADAPTER_DIR / "adapter_config.json").is_file()
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not [n for n in names if "lora" in n or "base_layer" in n]
    with (
        safe_open(str(final / "model.safetensors"), "pt") as f,
        safe_open(str(out / "model" / "model.safetensors"), "pt") as g,
    ):
        moved = max(float((f.get_tensor(n) - g.get_tensor(n)).abs().max()) for n in names)
    assert moved > 1e-2  # the published and exported weights are not the base model's

    more = load_recipe(RECIPE, [*SMALL, "run.total_steps=5", 'weights.transport="distributed"'])
    assert run_recipe(more, output=out, resume="auto") == "completed"
    events = read_events(out / "events.jsonl")
    resumed = [e for e in events if isinstance(e, RunResumed)]
    assert [e.step for e in resumed] == [3]
    after = events[events.index(resumed[0]) :]
    assert [e.transport for e in after if isinstance(e, Published)] == ["distributed"] * 2
    rows = train_rows(out)
    assert len(rows) == 5
    for row in rows[3:]:
        assert row["train/logprob_mismatch"] <= MISMATCH, row
