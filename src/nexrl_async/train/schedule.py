"""AdamW and the learning-rate schedule of ``[optim]``.

The schedule advances once per *training step* (one :class:`TrainBatch`), not per optimizer
step: all ``minibatches × epochs`` optimizer steps of a training step share one learning rate.
With ``s`` the 0-based training step, ``W = warmup_steps``, ``N = total_steps`` and
``r = min_lr_ratio``, the learning rate is ``lr · f(s)`` with::

    f(s) = (s + 1) / W                          for s < W  (linear warm-up, reaches 1 at W - 1)
    p    = clamp((s - W) / max(1, N - W), 0, 1)  after warm-up
    constant: f = 1
    linear:   f = r + (1 - r) · (1 - p)
    cosine:   f = r + (1 - r) · (1 + cos(pi · p)) / 2
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from nexrl_async.config.training import OptimConfig
from nexrl_async.core.errors import ConfigError


def lr_multiplier(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int | None,
    min_lr_ratio: float,
) -> float:
    """``f(step)`` of the module docstring."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ConfigError(
            f"optim.schedule = {schedule!r} needs run.total_steps", path="optim.schedule"
        )
    progress = min(max((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0), 1.0)
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"unknown optim.schedule {schedule!r}", path="optim.schedule")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> AdamW:
    """AdamW over the trainable ``params`` with ``[optim]``'s lr, betas, eps and weight decay."""
    trainable = [p for p in params if p.requires_grad]
    return AdamW(
        trainable,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, total_steps: int | None) -> LambdaLR:
    """The schedule above as a ``LambdaLR`` (call ``.step()`` once per training step).

    Raises:
        ConfigError: a decaying schedule without ``total_steps``.
    """
    if cfg.schedule != "constant" and total_steps is None:
        raise ConfigError(
            f"optim.schedule = {cfg.schedule!r} needs run.total_steps", path="optim.schedule"
        )

    def factor(step: int) -> float:
        return lr_multiplier(
            step,
            schedule=cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)
