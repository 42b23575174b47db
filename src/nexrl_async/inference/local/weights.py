"""Loading the served model and swapping its weights (torch thread).

Weights come from a safetensors folder (``/update_weights_from_disk``: the whole model) or from
tensors received through a process group (``/update_weights_from_distributed``: one bucket at a
time). Either way a swap is all-or-nothing for what it carries: every tensor is checked against
the live model (name, shape) before the first one is copied, so a bad update leaves the old
weights in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from loguru import logger
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers import PreTrainedTokenizerBase as Tokenizer

from nexrl_async.core.errors import ConfigError, WeightSyncError

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Tokenizer
    eos_ids: frozenset[int]
    context_length: int


def resolve_device(device: DeviceName) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def _eos_ids(model: PreTrainedModel, tokenizer: Tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def load_model(
    model_dir: str | Path,
    *,
    device: DeviceName,
    dtype: DtypeName,
    context_length: int | None = None,
) -> LoadedModel:
    """Model (eval mode, on ``device``) and tokenizer from a local HF folder."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a Hugging Face model folder (no config.json)")
    target = resolve_device(device)
    if dtype == "auto":
        torch_dtype: torch.dtype | str = torch.float32 if target.type == "cpu" else "auto"
    else:
        torch_dtype = _DTYPES[dtype]
    try:
        tokenizer = _load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the model in {path}: {err}") from err
    model = torch.nn.Module.to(model, target).eval()
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    ctx = context_length or limit or int(tokenizer.model_max_length)
    logger.info(
        "loaded {} ({} parameters, {}, {}), context {}",
        path,
        sum(p.numel() for p in model.parameters()),
        model.dtype,
        target,
        ctx,
    )
    return LoadedModel(model, tokenizer, _eos_ids(model, tokenizer), ctx)


def _load_tokenizer(path: Path) -> Tokenizer:
    """The folder's tokenizer as saved: ``tokenizer.json`` when there is one (transformers 5's
    ``AutoTokenizer`` swaps in its own class for ``qwen2`` folders, changing a custom
    tokenizer's pre-tokenizer), else ``AutoTokenizer``. The trainer loads it the same way
    (``train/model_loading.py``, ``load_tokenizer_folder``)."""
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def read_safetensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``model_dir``."""
    path = Path(model_dir)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise WeightSyncError(f"no *.safetensors files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (OSError, ValueError, RuntimeError) as err:
            raise WeightSyncError(f"cannot read {file}: {err}") from err
    return tensors


def swap_weights(
    model: PreTrainedModel,
    tensors: dict[str, torch.Tensor],
    live: dict[str, torch.Tensor] | None = None,
) -> int:
    """Copy ``tensors`` into ``model`` after checking all of them; returns tensors copied.

    A parameter may be absent from ``tensors`` only if it shares storage with one present
    (tied embeddings). ``live``: the model's ``state_dict()``, when the caller keeps one.
    """
    live = model.state_dict() if live is None else live
    _check_known(live, tensors)
    loaded_ptrs = {live[n].data_ptr() for n in tensors}
    missing = [n for n in live if n not in tensors and live[n].data_ptr() not in loaded_ptrs]
    if missing:
        raise WeightSyncError(f"tensors missing from the update: {missing[:5]}")
    return _copy(live, tensors)


def load_tensors(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> int:
    """Copy a subset of the weights (one bucket of a distributed update) into ``model``.

    All-or-nothing for the bucket: every name and shape is checked before the first copy.
    Values are cast to the live parameter's dtype and device.
    """
    live = model.state_dict()
    _check_known(live, tensors)
    return _copy(live, tensors)


def _check_known(live: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    unknown = sorted(set(tensors) - set(live))
    if unknown:
        raise WeightSyncError(f"unknown tensors for this model: {unknown[:5]}")
    bad = [n for n, t in tensors.items() if tuple(t.shape) != tuple(live[n].shape)]
    if bad:
        raise WeightSyncError(f"shape mismatch for {bad[:5]}")


def _copy(live: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> int:
    with torch.no_grad():
        for name, tensor in tensors.items():
            live[name].copy_(tensor.to(device=live[name].device, dtype=live[name].dtype))
    return len(tensors)
