"""Weights out of the trainer: HF folders, parameters for a transport, state files.

- :func:`save_hf_folder` writes ``save_pretrained`` safetensors plus the tokenizer into a
  temporary sibling folder, then renames it into place: a reader (an inference server loading
  ``/update_weights_from_disk``) sees the old folder or the complete new one, never a partial
  one.
- :func:`parameters_for_sync` yields ``(HF name, tensor)`` pairs, one at a time, so a transport
  can stream them (a sharded model gathers each one: ``sharding.gathered_parameters``).
- A LoRA policy (``train.lora``) is exported and synced merged, as the plain model
  (``W + s B A`` under the base model's names); an HF folder also gets the peft adapter folder
  ``adapter/`` (servers read only the top folder's safetensors).
- :func:`save_state_file` / :func:`load_state_file` are the checkpoint seam: ``torch.save`` of
  one state dict today; torch.distributed.checkpoint replaces them when weights are sharded.
"""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from nexrl_async.core.errors import CheckpointError
from nexrl_async.train.lora import is_lora, merged_parameters, save_merged

STATE_FILE = "trainer.pt"


def save_hf_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    *,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to the folder ``path``, atomically.

    An existing folder at ``path`` is replaced (moved aside, then deleted once the new one is in
    place). ``state_dict`` replaces the model's own weights (a sharded model's gathered full
    state, see ``sharding.full_state_dict``). A LoRA model is written merged, as the plain
    model, plus its adapter in ``path/adapter``. Returns ``path``.

    Raises:
        CheckpointError: the folder could not be written.
    """
    target = Path(path)
    tag = uuid.uuid4().hex[:8]
    staging = target.with_name(f".{target.name}.tmp-{tag}")
    retired = target.with_name(f".{target.name}.old-{tag}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_lora(model):
            save_merged(model, staging, model.state_dict() if state_dict is None else state_dict)
        else:
            model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
    except OSError as err:
        raise CheckpointError(f"cannot write the HF folder {target}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return target


def parameters_for_sync(
    model: torch.nn.Module, named: Iterable[tuple[str, Tensor]] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` for every parameter, in HF checkpoint naming, detached.

    ``named``: the model's parameters as whole tensors when they are not its own
    (``sharding.gathered_parameters`` of a sharded model); by default ``named_parameters``.
    Tied weights appear once (under the input embedding's name), as in ``save_pretrained``;
    a LoRA model's adapters are merged into their layers (``train.lora``).
    """
    params = named if named is not None else model.named_parameters()
    for name, param in merged_parameters(model, params):
        yield name, param.detach()


def save_state_file(state: dict[str, Any], directory: str | Path) -> Path:
    """``torch.save`` ``state`` to ``directory/trainer.pt`` via a temporary file and a rename."""
    folder = Path(directory)
    target = folder / STATE_FILE
    staging = folder / f".{STATE_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, staging)
        os.replace(staging, target)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"cannot write the trainer state {target}: {err}") from err
    finally:
        staging.unlink(missing_ok=True)
    return target


def load_state_file(directory: str | Path) -> dict[str, Any]:
    """The state dict :func:`save_state_file` wrote into ``directory`` (tensors on CPU)."""
    target = Path(directory) / STATE_FILE
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read the trainer state {target}: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{target} does not hold a state dict")
    return state
