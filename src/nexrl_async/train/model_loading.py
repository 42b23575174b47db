"""Load the policy (and its tokenizer) the trainer updates, and the frozen reference copy.

```
model, tok = load_policy(PretrainedModel(path="/models/qwen"), None, seed=0, device="cpu")
model, tok = load_policy(BuiltModel(), CharTokenizer(), seed=0, device="auto")
```

With ``[model.lora]`` the policy comes back wrapped with its adapters (``train.lora``): only
they train, and exports merge them into the plain model.

A pretrained model comes from a local Hugging Face folder (nothing is downloaded); a built model
comes from :mod:`nexrl_async.train.build`, seeded so the trainer and the local server that builds
the same config start from identical weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from loguru import logger
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from nexrl_async.config.model import (
    BuiltModel,
    CharTokenizer,
    ModelConfig,
    PretrainedTokenizer,
    TokenizerConfig,
)
from nexrl_async.core.errors import ConfigError
from nexrl_async.train.build import build_char_tokenizer, build_model
from nexrl_async.train.lora import apply_lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(name: DeviceName | str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device = 'cuda' but CUDA is not available", path="trainer.device"
        )
    return device


def set_torch_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (process-wide); ``None`` keeps torch's choice."""
    if threads is not None:
        torch.set_num_threads(threads)


def load_tokenizer(
    tokenizer_cfg: TokenizerConfig | None, model_cfg: ModelConfig
) -> PreTrainedTokenizerBase:
    """The tokenizer a section names; ``None`` means the one in the pretrained model's folder."""
    if isinstance(tokenizer_cfg, CharTokenizer):
        return build_char_tokenizer(tokenizer_cfg)
    if isinstance(tokenizer_cfg, PretrainedTokenizer):
        path = tokenizer_cfg.path
    elif isinstance(model_cfg, BuiltModel):
        raise ConfigError("a built model needs a [tokenizer] section", path="tokenizer")
    else:
        path = model_cfg.path
    try:
        tok = load_tokenizer_folder(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {path}: {err}", path="tokenizer") from err
    if tokenizer_cfg is not None and tokenizer_cfg.chat_template is not None:
        tok.chat_template = tokenizer_cfg.chat_template
    return tok


def load_tokenizer_folder(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the local HF folder ``path``, as saved.

    A folder with a ``tokenizer.json`` is loaded as exactly that tokenizer (normalizer,
    pre-tokenizer, decoder, special tokens and chat template from ``tokenizer_config.json``):
    transformers 5's ``AutoTokenizer`` loads every ``qwen2`` (and a few other) model folder
    with its own tokenizer class, which rebuilds the pre-tokenizer and so silently changes a
    custom tokenizer (spaces and newlines dropped). Folders without one (sentencepiece-only)
    go through ``AutoTokenizer``. The local server loads its tokenizer the same way
    (``inference/local/weights.py``).
    """
    folder = Path(path)
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_policy(
    model_cfg: ModelConfig,
    tokenizer_cfg: TokenizerConfig | None,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy model (on ``device``, in eval mode) and its tokenizer.

    Args:
        model_cfg: ``PretrainedModel`` (local HF folder) or ``BuiltModel`` (fresh, seeded).
        tokenizer_cfg: the ``[tokenizer]`` section; ``None`` uses the model folder's tokenizer.
        seed: initialisation seed of a built model (ignored for pretrained weights).
        device: a torch device, or ``"auto"``/``"cpu"``/``"cuda"``.
        dtype: parameter dtype; defaults to ``model_cfg.dtype``.

    Raises:
        ConfigError: no model or tokenizer at the given paths, a bad built model, or
            ``[model.lora]`` targets that are not linear layers.
    """
    target = resolve_device(device) if isinstance(device, str) else device
    param_dtype = dtype or DTYPES[model_cfg.dtype]
    if isinstance(model_cfg, BuiltModel):
        tokenizer = load_tokenizer(tokenizer_cfg, model_cfg)
        model = build_model(
            model_cfg,
            vocab_size=len(tokenizer),
            seed=seed,
            pad_token_id=_token_id(tokenizer, "pad"),
            bos_token_id=_token_id(tokenizer, "bos"),
            eos_token_id=_token_id(tokenizer, "eos"),
        )
    else:
        model = _load_pretrained(Path(model_cfg.path), model_cfg.attn_implementation, param_dtype)
        tokenizer = load_tokenizer(tokenizer_cfg, model_cfg)
    _move(model, target, param_dtype)
    if model_cfg.lora is not None:
        model = apply_lora(model, model_cfg.lora, seed=seed)
    model.eval()
    logger.debug(
        "policy loaded: {} parameters, {} on {}",
        sum(p.numel() for p in model.parameters()),
        param_dtype,
        target,
    )
    return model, tokenizer


def _token_id(tokenizer: PreTrainedTokenizerBase, which: str) -> int:
    value = getattr(tokenizer, f"{which}_token_id", None)
    if not isinstance(value, int):
        raise ConfigError(f"the tokenizer has no {which} token", path="tokenizer")
    return value


def _load_pretrained(path: Path, attn: str, dtype: torch.dtype) -> PreTrainedModel:
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} is not a Hugging Face model folder (no config.json)", path="model.path"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation=attn
        )
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"cannot load the model in {path}: {err}", path="model.path") from err


def frozen_copy(model: PreTrainedModel, *, on_cpu: bool) -> PreTrainedModel:
    """A frozen deep copy of ``model`` (eval mode, no grads), on CPU if ``on_cpu``."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    if on_cpu:
        _move(reference, torch.device("cpu"), None)
    reference.eval()
    return reference


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """``module.to(...)`` in place (typed through ``nn.Module``: transformers wraps ``.to``)."""
    module.to(device=device, dtype=dtype)
