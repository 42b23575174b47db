"""Recipe sections ``[model]`` and ``[tokenizer]``."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from nexrl_async.config.types import PathStr, PosFloat, PosInt

Dtype = Literal["float32", "bfloat16", "float16"]


class _ModelCommon(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    dtype: Dtype = "float32"
    """Parameter dtype of the trainer's master weights and of the local server."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel; ``flash_attention_2`` needs flash-attn and a GPU."""


class PretrainedModel(_ModelCommon, frozen=True, kw_only=True, tag="pretrained"):
    """A causal LM in a local Hugging Face folder (``config.json`` + safetensors)."""

    path: PathStr
    """Local HF model folder. Nothing is downloaded at run time."""


class BuiltModel(_ModelCommon, frozen=True, kw_only=True, tag="build"):
    """A small model built from a config (tests, the CPU demo). Seeded by ``run.seed``."""

    architecture: Literal["qwen2", "llama"] = "qwen2"
    """Transformers architecture to instantiate."""
    hidden_size: PosInt = 64
    """Width of the residual stream."""
    intermediate_size: PosInt = 256
    """Width of the MLP."""
    num_hidden_layers: PosInt = 2
    """Decoder layers."""
    num_attention_heads: PosInt = 4
    """Query heads; must divide ``hidden_size``."""
    num_key_value_heads: PosInt | None = None
    """Key/value heads; must divide ``num_attention_heads`` (defaults to it: no GQA)."""
    max_position_embeddings: PosInt = 512
    """Context length of the model (and of the local server)."""
    rope_theta: PosFloat = 10000.0
    """RoPE base frequency."""
    tie_word_embeddings: bool = True
    """Share input embedding and LM head."""


ModelConfig = PretrainedModel | BuiltModel


class _TokenizerCommon(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"
):
    chat_template: str | None = None
    """Jinja chat template overriding the tokenizer's own."""


class PretrainedTokenizer(_TokenizerCommon, frozen=True, kw_only=True, tag="pretrained"):
    """A tokenizer saved in a local HF folder."""

    path: PathStr
    """Local HF tokenizer folder."""


class CharTokenizer(_TokenizerCommon, frozen=True, kw_only=True, tag="chars"):
    """A character-level tokenizer built locally (tests, the CPU demo)."""

    alphabet: str = "0123456789"
    """Characters that get a token each (plus the special tokens)."""
    specials: list[str] = msgspec.field(
        default_factory=lambda: ["<pad>", "<bos>", "<eos>", "<sep>"]
    )
    """Special tokens, in id order; ids 0.. are these, then the alphabet."""


TokenizerConfig = PretrainedTokenizer | CharTokenizer
