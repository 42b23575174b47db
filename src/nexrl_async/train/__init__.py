"""Training: model load, the train step, loss, packing, checkpoints; rank plumbing in ``ranks/``.

Owns: everything torch does on the training ranks: loading the policy
(:func:`load_policy`), the :class:`Trainer` (one blocking ``step(batch) -> metrics`` per
training step, built from a :class:`TrainerSpec`; it implements
:class:`nexrl_async.core.protocols.PolicyTrainer`), HF export and trainer state.
Must not import: ``inference``, ``rollout``, ``weights``, ``engine``.
"""

from __future__ import annotations

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
