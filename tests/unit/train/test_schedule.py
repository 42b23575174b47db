from __future__ import annotations

import math

import pytest
import torch

from nexrl_async.config.training import OptimConfig
from nexrl_async.core.errors import ConfigError
from nexrl_async.train.schedule import build_optimizer, build_scheduler, lr_multiplier


def _f(step: int, schedule: str, warmup: int = 0, total: int | None = 10, r: float = 0.0) -> float:
    return lr_multiplier(
        step, schedule=schedule, warmup_steps=warmup, total_steps=total, min_lr_ratio=r
    )


def test_warmup_is_linear_and_reaches_one_on_its_last_step() -> None:
    assert [_f(s, "constant", warmup=4, total=None) for s in range(6)] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        1.0,
    ]


def test_linear_and_cosine_decay_to_the_min_ratio() -> None:
    assert _f(0, "linear") == 1.0
    assert _f(5, "linear") == pytest.approx(0.5)
    assert _f(10, "linear") == 0.0
    assert _f(50, "linear", r=0.1) == pytest.approx(0.1)
    assert _f(0, "cosine") == 1.0
    assert _f(5, "cosine") == pytest.approx(0.5)
    assert _f(10, "cosine", r=0.2) == pytest.approx(0.2)
    # after a 2-step warm-up, progress counts from the warm-up's end
    assert _f(2, "cosine", warmup=2) == 1.0
    assert _f(6, "cosine", warmup=2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_decaying_schedules_need_total_steps() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="total_steps"):
        build_scheduler(opt, OptimConfig(schedule="cosine"), None)
    build_scheduler(opt, OptimConfig(schedule="constant", warmup_steps=3), None)


def test_scheduler_drives_the_optimizer_learning_rate() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    cfg = OptimConfig(lr=0.1, schedule="linear", warmup_steps=2, min_lr_ratio=0.0)
    opt = build_optimizer([param], cfg)
    sched = build_scheduler(opt, cfg, total_steps=6)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025, 0.0])


def test_optimizer_takes_the_adamw_settings_and_skips_frozen_parameters() -> None:
    live = torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    cfg = OptimConfig(lr=3e-4, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.1)
    opt = build_optimizer([live, frozen], cfg)
    group = opt.param_groups[0]
    assert group["params"] == [live]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        3e-4,
        (0.8, 0.95),
        1e-6,
        0.1,
    )
