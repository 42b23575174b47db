"""Tiny trainers, models and batches for the integration tests (built in code, one thread)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tiny_train import TINY, _one_thread, make_batch, make_traj, tiny_model

from nexrl_async.config.model import CharTokenizer
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

__all__ = ["_one_thread", "make_batch", "make_trainer", "make_traj", "tiny_model"]


@pytest.fixture
def make_trainer() -> Callable[..., Trainer]:
    """``make_trainer(algorithm=..., optim=..., trainer=..., **kwargs)``: a trainer of ``TINY``."""

    def make(
        *,
        algorithm: AlgorithmConfig | None = None,
        optim: OptimConfig | None = None,
        trainer: TrainerConfig | None = None,
        **kwargs: Any,
    ) -> Trainer:
        kwargs.setdefault("max_new_tokens", 8)
        spec = TrainerSpec(
            model=TINY,
            tokenizer=CharTokenizer(),
            algorithm=algorithm or AlgorithmConfig(),
            optim=optim or OptimConfig(lr=1e-2, max_grad_norm=None),
            trainer=trainer or TrainerConfig(micro_batch_tokens=16, threads=1),
            seed=0,
            **kwargs,
        )
        return Trainer.from_spec(spec)

    return make
