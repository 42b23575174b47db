"""SFT on reverse-digits without the engine: the SFT worker builds trajectories from the data,
the trainer trains on them, and the validation loss (and greedy accuracy) shows it learned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from nexrl_async.config.loader import LoadedRecipe, load_recipe
from nexrl_async.core.records import DataItem, TrainBatch, VersionToken
from nexrl_async.data.source import iterate_once
from nexrl_async.rollout.loading import load_worker
from nexrl_async.rollout.sft_worker import SFTWorker
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

RECIPE = Path(__file__).parents[3] / "recipes" / "reverse_digits" / "sft.toml"
STEPS = 50


class IdleGenerator:
    """The SFT worker must never generate."""

    calls = 0

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        IdleGenerator.calls += 1
        raise AssertionError("the SFT worker called the inference server")


@pytest.fixture(scope="module")
def loaded() -> LoadedRecipe:
    return load_recipe(RECIPE)


@pytest.fixture
def trainer(loaded: LoadedRecipe) -> Trainer:
    cfg = loaded.config
    assert cfg.algorithm.mode == "sft"
    assert cfg.rollout.group_size == 1
    return Trainer.from_spec(TrainerSpec.from_recipe(cfg, loaded.base_dir))


async def groups_of(worker: SFTWorker, items: list[DataItem], version: int) -> TrainBatch:
    token = VersionToken(lease_id=version, version=version)
    groups = [await worker.run_group(it, token, group_id=f"g{i}") for i, it in enumerate(items)]
    assert all(g.ok and len(g.trajectories) == 1 for g in groups)
    return TrainBatch(step=version, groups=groups)


def greedy_exact(trainer: Trainer, batch: TrainBatch, answers: list[str]) -> float:
    """Fraction of prompts whose greedy 3-token continuation decodes to the answer."""
    prompts = torch.tensor([t.turns[0].token_ids for t in batch.trajectories])  # equal lengths
    with torch.no_grad():
        out = trainer.model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3, do_sample=False
        )
    texts = trainer.tokenizer.batch_decode(out[:, prompts.shape[1] :], skip_special_tokens=True)
    return sum(t.strip() == a for t, a in zip(texts, answers, strict=True)) / len(answers)


async def test_sft_steps_lower_the_validation_loss(loaded: LoadedRecipe, trainer: Trainer) -> None:
    cfg, base_dir = loaded.config, loaded.base_dir
    worker = load_worker(
        cfg.rollout, tokenizer=trainer.tokenizer, generator=IdleGenerator(), base_dir=base_dir,
        required=list(cfg.data.required),
    )  # fmt: skip
    assert isinstance(worker, SFTWorker)
    assert cfg.validation.data is not None
    val_items = iterate_once(cfg.validation.data, base_dir)
    val = await groups_of(worker, val_items, 0)
    answers = [str(item.fields["answer"]) for item in val_items]
    before = trainer.validation_loss(val)
    assert before["val/tokens"] == 3 * len(val_items)  # two digits and EOS per answer
    size = cfg.pool.batch_groups
    items = iterate_once(cfg.data, base_dir, STEPS * size, shuffle=True)
    losses = []
    for step in range(STEPS):
        batch = await groups_of(worker, items[step * size : (step + 1) * size], step)
        metrics = await anyio.to_thread.run_sync(trainer.step, batch)
        losses.append(metrics["train/loss"])
    after = trainer.validation_loss(val)
    assert after["val/loss"] < 0.3 * before["val/loss"], (before, after)
    assert after["val/ppl"] < before["val/ppl"]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert greedy_exact(trainer, val, answers) >= 0.8
    assert IdleGenerator.calls == 0
