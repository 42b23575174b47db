"""The Python API: train a recipe from a script or a notebook and get a result back.

Owns: ``train`` / ``train_async`` and :class:`RunResult`, callbacks and :class:`RunControl`,
recipes given as mappings or structs with Python objects in them, the ``grpo`` shortcut.
Must not import: ``nexrl_async.cli``. (docs/api.md)
"""

from __future__ import annotations

from nexrl_async.api.callbacks import (
    Checkpoint,
    RunControl,
    RunEvent,
    StepEnd,
    Validation,
)
from nexrl_async.api.entry import RunResult, train, train_async
from nexrl_async.api.objects import Rows
from nexrl_async.api.quick import RewardFunction, grpo
from nexrl_async.api.recipes import Overrides, RecipeLike
from nexrl_async.core.errors import CallbackError

__all__ = [
    "CallbackError",
    "Checkpoint",
    "Overrides",
    "RecipeLike",
    "RewardFunction",
    "Rows",
    "RunControl",
    "RunEvent",
    "RunResult",
    "StepEnd",
    "Validation",
    "grpo",
    "train",
    "train_async",
]
