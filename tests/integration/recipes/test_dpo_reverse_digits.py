"""DPO on reverse-digits without the engine: the preference worker builds pairs (the correct
reversal chosen over a wrong one) from the recipe's data, the trainer takes DPO steps, and both
the held-out preference accuracy and the greedy accuracy of generations rise."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from nexrl_async.config.loader import LoadedRecipe, load_recipe
from nexrl_async.core.records import DataItem, TrainBatch, VersionToken
from nexrl_async.data.source import iterate_once
from nexrl_async.rollout.loading import load_worker
from nexrl_async.rollout.preference_worker import PreferenceWorker
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "dpo.toml"
STEPS = 60  # greedy accuracy 0.0 -> ~0.8, held-out preference accuracy ~0.97


class IdleGenerator:
    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the preference worker called the inference server")


async def pairs_of(worker: PreferenceWorker, items: list[DataItem], step: int) -> TrainBatch:
    token = VersionToken(lease_id=step, version=step)
    groups = [await worker.run_group(it, token, group_id=f"g{i}") for i, it in enumerate(items)]
    assert all(g.ok and len(g.trajectories) == 2 for g in groups)
    return TrainBatch(step=step, groups=groups)


def greedy_accuracy(trainer: Trainer, batch: TrainBatch, answers: list[str]) -> float:
    """Mean positional accuracy of the greedy 3-token continuations (the evaluator's reward)."""
    prompts = torch.tensor([g.trajectories[0].turns[0].token_ids for g in batch.groups])
    with torch.no_grad():
        out = trainer.model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3, do_sample=False
        )
    texts = trainer.tokenizer.batch_decode(out[:, prompts.shape[1] :], skip_special_tokens=True)
    right = [sum(a == b for a, b in zip(ans, t.strip(), strict=False)) / len(ans)
             for t, ans in zip(texts, answers, strict=True)]  # fmt: skip
    return sum(right) / len(right)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_dpo_steps_raise_preference_and_greedy_accuracy() -> None:
    loaded: LoadedRecipe = load_recipe(RECIPE)
    cfg, base_dir = loaded.config, loaded.base_dir
    assert cfg.algorithm.mode == "dpo"
    trainer = Trainer.from_spec(TrainerSpec.from_recipe(cfg, base_dir))
    worker = load_worker(
        cfg.rollout, tokenizer=trainer.tokenizer, generator=IdleGenerator(), base_dir=base_dir,
        required=list(cfg.data.required),
    )  # fmt: skip
    assert isinstance(worker, PreferenceWorker)
    assert cfg.validation.data is not None
    val_items = iterate_once(cfg.validation.data, base_dir)
    val = await pairs_of(worker, val_items, 0)
    answers = [str(item.fields["answer"]) for item in val_items]
    before = trainer.validation_loss(val)
    greedy_before = greedy_accuracy(trainer, val, answers)
    assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    size = cfg.pool.batch_groups
    items = iterate_once(cfg.data, base_dir, STEPS * size, shuffle=True)
    for step in range(STEPS):
        batch = await pairs_of(worker, items[step * size : (step + 1) * size], step)
        metrics = await anyio.to_thread.run_sync(trainer.step, batch)
        if step == 0:
            assert abs(metrics["train/loss"] - math.log(2)) < 1e-6
    after = trainer.validation_loss(val)
    greedy_after = greedy_accuracy(trainer, val, answers)
    assert after["val/preference_accuracy"] > 0.9, after
    assert after["val/loss"] < 0.5 * before["val/loss"], (before, after)
    assert greedy_after > greedy_before + 0.3, (greedy_before, greedy_after)
