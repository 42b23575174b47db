"""The names the engine imports from ``nexrl_async.train`` are pinned."""

from __future__ import annotations

import inspect

import nexrl_async.train as train


def test_public_names_are_pinned() -> None:
    assert sorted(train.__all__) == [
        "StepMetrics",
        "SupportsStep",
        "Trainer",
        "load_policy",
        "resolve_device",
        "run_step",
    ]


def test_trainer_surface_the_engine_calls() -> None:
    for name in (
        "step",
        "from_config",
        "save_hf",
        "named_parameters_for_sync",
        "state_dict",
        "load_state_dict",
        "save_checkpoint",
        "load_checkpoint",
    ):
        assert callable(getattr(train.Trainer, name)), name
    params = inspect.signature(train.Trainer.from_config).parameters
    assert list(params)[:3] == ["model_cfg", "tokenizer_cfg", "algorithm"]
    assert {"optim", "trainer", "seed", "max_new_tokens", "total_steps", "temperature"} <= set(
        params
    )
    assert inspect.iscoroutinefunction(train.run_step)
