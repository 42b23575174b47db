"""Trainer checkpoints with torch.distributed.checkpoint (DCP), and the process's RNG state.

A trainer checkpoint is two things in one folder::

    <dir>/trainer/            DCP: model + optimizer state (one shard file per rank, .metadata)
    <dir>/trainer_extra.pt    scheduler, steps_done, KL controller (torch.save, rank 0 writes)

Model and optimizer go through ``torch.distributed.checkpoint.state_dict.get_state_dict`` /
``set_state_dict``, so the same code saves a plain module at world size 1 and an FSDP2-sharded
one at world size N (every rank calls :func:`save_state` / :func:`load_state`; each writes and
reads its own shards). Without an initialized process group DCP runs in single-process mode
(``no_dist``). The optimizer state is keyed by parameter names, not positions, so it loads into
a trainer built again from the same config.

Only trainable parameters are saved (``ignore_frozen_params``): everything, in full
fine-tuning; the adapters alone with ``[model.lora]``, whose frozen base a resumed run rebuilds
from the recipe like the reference model. Loading asks the checkpoint for exactly the new
trainer's trainable parameters, so a checkpoint of the other kind (LoRA or not, another rank)
does not fit and is a ``CheckpointError``.

The reference model is not saved: it is a frozen copy of the initial weights, which a resumed run
rebuilds from the recipe (see ``train.trainer``).

Everything here blocks: call it from a worker thread, one torch call at a time (the engine's
torch limiter), never while a train step runs.
"""

from __future__ import annotations

import os
import pickle
import random
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from nexrl_async.core.errors import CheckpointError

MODEL_DIR = "trainer"
"""DCP folder (model + optimizer) inside a checkpoint folder."""
EXTRA_FILE = "trainer_extra.pt"
"""Scheduler, steps done and KL controller state inside a checkpoint folder."""
EXTRA_FORMAT = 1

_TRAINABLE = StateDictOptions(ignore_frozen_params=True)
_TRAINABLE_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)
"""Non-strict: the frozen parameters are missing on purpose; the trainable ones were all
loaded (DCP fails on any key the checkpoint lacks)."""

# DCP warns on every single-process save/load even when asked for one (``no_dist=True``).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")


@runtime_checkable
class CheckpointableTrainer(Protocol):
    """What :func:`save_trainer` needs of a trainer (``train.Trainer`` has it)."""

    model: torch.nn.Module
    optimizer: Optimizer
    scheduler: LRScheduler
    steps_done: int


def save_state(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write model + optimizer (DCP) and scheduler + ``extra`` into ``directory``; return it.

    ``extra`` holds plain values (ints, floats, strings, lists, dicts, tensors). Every rank calls
    this; only rank 0 writes the extra file.

    Raises:
        CheckpointError: a file could not be written.
    """
    folder = Path(directory)
    model_sd, optim_sd = _trainable_state(model, optimizer)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        state = {"model": model_sd, "optim": optim_sd}
        dcp_save(state, checkpoint_id=folder / MODEL_DIR, **_dist())
        if _rank() == 0:
            payload = {
                "format": EXTRA_FORMAT,
                "scheduler": scheduler.state_dict(),
                "extra": dict(extra or {}),
            }
            _save_atomically(payload, folder / EXTRA_FILE)
    # DCP's CheckpointException derives from BaseException, not Exception
    except (OSError, RuntimeError, ValueError, CheckpointException) as err:
        raise CheckpointError(f"cannot write the trainer checkpoint in {folder}: {err}") from err
    return folder


def load_state(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
) -> dict[str, Any]:
    """Load what :func:`save_state` wrote into the given objects; return its ``extra``.

    The objects must come from the same config (same parameter names and shapes).

    Raises:
        CheckpointError: missing or unreadable files, or state that does not fit.
    """
    folder = Path(directory)
    if not has_state(folder):
        raise CheckpointError(f"{folder} holds no trainer checkpoint ({MODEL_DIR}/, {EXTRA_FILE})")
    model_sd, optim_sd = _trainable_state(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    try:
        dcp_load(state, checkpoint_id=folder / MODEL_DIR, **_dist())  # every key asked for
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=_TRAINABLE_LOAD,
        )
        payload = torch.load(folder / EXTRA_FILE, map_location="cpu", weights_only=True)
    except (
        OSError,
        RuntimeError,
        ValueError,
        KeyError,
        pickle.UnpicklingError,
        CheckpointException,
    ) as err:
        raise CheckpointError(f"cannot load the trainer checkpoint in {folder}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != EXTRA_FORMAT:
        raise CheckpointError(f"{folder / EXTRA_FILE}: unknown format")
    try:
        scheduler.load_state_dict(payload["scheduler"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / EXTRA_FILE}: bad scheduler state: {err}") from err
    extra = payload.get("extra")
    return dict(extra) if isinstance(extra, dict) else {}


def has_state(directory: str | Path) -> bool:
    """Whether ``directory`` holds a trainer checkpoint."""
    folder = Path(directory)
    return (folder / MODEL_DIR / ".metadata").is_file() and (folder / EXTRA_FILE).is_file()


def save_trainer(trainer: CheckpointableTrainer, directory: str | Path) -> Path:
    """:func:`save_state` of a trainer: its objects plus ``steps_done`` and the KL controller."""
    kl = getattr(trainer, "kl_controller", None)
    extra = {"steps_done": trainer.steps_done, "kl_controller": kl.state_dict() if kl else None}
    return save_state(
        directory,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        extra=extra,
    )


def load_trainer(trainer: CheckpointableTrainer, directory: str | Path) -> None:
    """Restore what :func:`save_trainer` wrote into a trainer built from the same config."""
    extra = load_state(
        directory, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler
    )
    steps = extra.get("steps_done")
    if not isinstance(steps, int):
        raise CheckpointError(f"{directory}: trainer checkpoint lacks steps_done")
    trainer.steps_done = steps
    kl, kl_state = getattr(trainer, "kl_controller", None), extra.get("kl_controller")
    if kl is not None and kl_state is not None:
        try:
            kl.load_state_dict(kl_state)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{directory}: bad KL controller state: {err}") from err


# ---- RNG ------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python's and torch's global RNG states as msgpack-able values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state` output (CUDA states only where CUDA is present)."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(_byte_tensor(state["torch"]))
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"bad RNG state in the checkpoint: {err}") from err


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# ---- internals ------------------------------------------------------------------------------


def _trainable_state(
    model: torch.nn.Module, optimizer: Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model (trainable parameters and buffers) and optimizer state dicts for DCP.

    ``ignore_frozen_params`` drops a frozen parameter under its first name only; a second name
    of the same tensor (an LM head tied to a frozen embedding) is dropped here.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_TRAINABLE)
    frozen = {
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if not param.requires_grad
    }
    return {k: v for k, v in model_sd.items() if k not in frozen}, dict(optim_sd)


def _dist() -> dict[str, bool]:
    """DCP's single-process mode when no process group is up (world size 1)."""
    return {"no_dist": not (dist.is_available() and dist.is_initialized())}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _save_atomically(payload: dict[str, Any], target: Path) -> None:
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(payload, staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
