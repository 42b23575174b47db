"""The names the engine imports from ``nexrl_async.train`` are pinned."""

from __future__ import annotations

import inspect

import nexrl_async.train as train
from nexrl_async.core.protocols import PolicyTrainer


def test_public_names_are_pinned() -> None:
    assert sorted(train.__all__) == [
        "StepMetrics",
        "Trainer",
        "TrainerSpec",
        "load_policy",
        "resolve_device",
    ]


def test_the_trainer_has_every_member_of_the_engines_protocol() -> None:
    members = {name for name, _ in inspect.getmembers(PolicyTrainer) if not name.startswith("_")}
    assert members == {
        "tokenizer", "context_length", "steps_done", "step", "compute_logprobs",
        "validation_loss", "save_hf", "named_parameters_for_sync", "save_checkpoint",
        "load_checkpoint", "shutdown",
    }  # fmt: skip
    for name in members - {"tokenizer", "steps_done"}:  # instance attributes
        assert hasattr(train.Trainer, name), name
    params = inspect.signature(train.Trainer.from_spec).parameters
    assert list(params)[:2] == ["spec", "groups"]
