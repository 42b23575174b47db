"""nexrl_async: an async, event-driven RL post-training engine for LLM agents.

``import nexrl_async`` stays light: the Python API (``nexrl_async.train``, ``train_async``,
``grpo``, ``RunResult``, the callback events) is imported from :mod:`nexrl_async.api` on first
use. ``nexrl_async.train`` is also the training package (``nexrl_async/train/``), which is
callable: calling it runs :func:`nexrl_async.api.train`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nexrl_async.__about__ import __version__

if TYPE_CHECKING:
    from nexrl_async.api import (
        CallbackError,
        Checkpoint,
        RunControl,
        RunResult,
        StepEnd,
        Validation,
        grpo,
        train,
        train_async,
    )

_API = (
    "CallbackError",
    "Checkpoint",
    "RunControl",
    "RunResult",
    "StepEnd",
    "Validation",
    "grpo",
    "train",
    "train_async",
)

__all__ = [
    "CallbackError",
    "Checkpoint",
    "RunControl",
    "RunResult",
    "StepEnd",
    "Validation",
    "__version__",
    "grpo",
    "train",
    "train_async",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        api = importlib.import_module("nexrl_async.api")
        if name == "train":  # the training package shares the name and forwards calls to it
            return importlib.import_module("nexrl_async.train")
        return getattr(api, name)
    raise AttributeError(f"module 'nexrl_async' has no attribute {name!r}")
