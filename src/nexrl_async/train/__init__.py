"""Training: model load, the train step, loss, packing, checkpoints; rank plumbing in ``ranks/``.

Owns: everything torch does on the training ranks: loading the policy
(:func:`load_policy`), the :class:`Trainer` (one blocking ``step(batch) -> metrics`` per
training step, built from a :class:`TrainerSpec`; it implements
:class:`nexrl_async.core.protocols.PolicyTrainer`), HF export and trainer state.
Must not import: ``inference``, ``rollout``, ``weights``, ``engine``.

The package is also callable: ``nexrl_async.train(recipe, output=...)`` is the Python API's
``train`` (docs/api.md), which shares this package's name; the call is forwarded by name, so
nothing here imports the API.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from nexrl_async.train.model_loading import load_policy, resolve_device
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import StepMetrics, Trainer

__all__ = [
    "StepMetrics",
    "Trainer",
    "TrainerSpec",
    "load_policy",
    "resolve_device",
]


class _CallablePackage(types.ModuleType):
    """This package's class: calling it runs ``nexrl_async.api.train``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module("nexrl_async.api").train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
