"""DCP trainer checkpoints at world size 1 (no process group) and RNG state."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from nexrl_async.core.errors import CheckpointError
from nexrl_async.train.checkpoint import (
    EXTRA_FILE,
    MODEL_DIR,
    CheckpointableTrainer,
    has_state,
    load_state,
    load_trainer,
    rng_state,
    save_state,
    save_trainer,
    set_rng_state,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def test_trainer_round_trip_restores_weights_optimizer_schedule_and_counters(
    tmp_path: Path, new_trainer: Callable[..., Any]
) -> None:
    torch.manual_seed(0)
    trainer = new_trainer()
    assert isinstance(trainer, CheckpointableTrainer)
    trainer.step()
    trainer.step()
    assert trainer.kl_controller is not None
    trainer.kl_controller.coef = 0.37
    save_trainer(trainer, tmp_path)
    assert has_state(tmp_path)
    assert (tmp_path / MODEL_DIR / ".metadata").is_file()

    torch.manual_seed(1)  # different initial weights: everything must come from the files
    fresh = new_trainer()
    load_trainer(fresh, tmp_path)
    saved, loaded = trainer.model.state_dict(), fresh.model.state_dict()
    assert saved.keys() == loaded.keys()
    for name, value in saved.items():
        assert torch.equal(value, loaded[name]), name
    assert fresh.model.head.weight is fresh.model.embed.weight  # still tied
    assert fresh.steps_done == 2
    assert fresh.kl_controller is not None
    assert fresh.kl_controller.coef == 0.37
    assert fresh.scheduler.state_dict()["last_epoch"] == 2
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    # the next step is the same step on both: optimizer moments were restored
    trainer.step()
    fresh.step()
    for a, b in zip(trainer.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=0, rtol=0)


def test_extra_state_comes_back(tmp_path: Path, new_trainer: Callable[..., Any]) -> None:
    trainer = new_trainer()
    parts = {"model": trainer.model, "optimizer": trainer.optimizer, "scheduler": trainer.scheduler}
    save_state(tmp_path, **parts, extra={"note": [1, 2], "x": 0.5})
    assert load_state(tmp_path, **parts) == {"note": [1, 2], "x": 0.5}


def test_missing_or_mismatched_state_is_a_checkpoint_error(
    tmp_path: Path, new_trainer: Callable[..., Any]
) -> None:
    with pytest.raises(CheckpointError, match="no trainer checkpoint"):
        load_trainer(new_trainer(), tmp_path)
    save_trainer(new_trainer(), tmp_path)
    wider = new_trainer(width=8)
    with pytest.raises(CheckpointError):
        load_trainer(wider, tmp_path)
    (tmp_path / EXTRA_FILE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        load_trainer(new_trainer(), tmp_path)


def test_rng_state_round_trip() -> None:
    state = rng_state()
    expected = (random.random(), torch.rand(3))
    set_rng_state(state)
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])
    with pytest.raises(CheckpointError):
        set_rng_state({"python": "nonsense"})
