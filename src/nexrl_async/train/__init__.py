"""Training: topology, model load and sharding, the train step, rank protocol, checkpoints.

Owns: everything torch does on the training ranks: loading the policy
(:func:`load_policy`), the :class:`Trainer` (one blocking ``step(batch) -> metrics`` per
training step; :func:`run_step` runs it off the event loop), HF export and trainer state.
Must not import: ``inference``, ``rollout``, ``weights``, ``engine``.
"""

from __future__ import annotations

from nexrl_async.train.model_loading import load_policy, resolve_device
from nexrl_async.train.trainer import StepMetrics, SupportsStep, Trainer, run_step

__all__ = [
    "StepMetrics",
    "SupportsStep",
    "Trainer",
    "load_policy",
    "resolve_device",
    "run_step",
]
