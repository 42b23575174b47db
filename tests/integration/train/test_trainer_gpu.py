"""The trainer on CUDA (skipped without it): device moves, CPU reference, bf16 weights."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.config.training import AlgorithmConfig, KLConfig, OptimConfig, TrainerConfig
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rl_step_on_cuda_with_the_reference_on_cpu(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch], dtype: str
) -> None:
    model = BuiltModel(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        dtype=dtype,  # type: ignore[arg-type]
    )
    algo = AlgorithmConfig(kl=KLConfig(placement="loss"), reference_on_cpu=True, entropy_coef=0.01)
    spec = TrainerSpec(
        model=model,
        tokenizer=CharTokenizer(),
        algorithm=algo,
        optim=OptimConfig(lr=1e-3),
        trainer=TrainerConfig(device="cuda", micro_batch_tokens=8),
        seed=0,
        max_new_tokens=8,
    )
    trainer = Trainer.from_spec(spec)
    assert trainer.device.type == "cuda"
    assert trainer.reference is not None
    assert next(trainer.reference.parameters()).device.type == "cpu"
    batch = make_batch(
        [
            make_traj("a", 0, [1, 4, 5], [6, 7, 2], reward=1.0),
            make_traj("a", 1, [1, 4, 5], [8, 9, 10, 2], reward=0.0),
        ]
    )
    for _ in range(2):
        metrics = trainer.step(batch)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["train/optimizer_steps"] == 1.0
    assert torch.cuda.is_available()
