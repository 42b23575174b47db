"""Recipe sections ``[model]`` and ``[tokenizer]``."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from nexrl_async.config.types import PathStr, PosFloat, PosInt

Dtype = Literal["float32", "bfloat16", "float16"]

ModuleName = Annotated[str, Meta(min_length=1)]


class LoraConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[model.lora]``: train low-rank adapters (peft) instead of the whole model (docs/lora.md).

    Each targeted linear layer ``W`` gets ``A`` (``rank x in``, random) and ``B``
    (``out x rank``, zero) and computes ``W x + s B A x`` with ``s = alpha / rank``
    (``alpha / sqrt(rank)`` with ``rslora``); only ``A`` and ``B`` train and are checkpointed.
    Servers get the merged weights ``W + s B A``.
    """

    rank: PosInt = 8
    """Rank of every adapter."""
    alpha: PosFloat = 16.0
    """Scale numerator: the adapter's output is multiplied by ``alpha / rank``."""
    dropout: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.0
    """Dropout on the adapters' input while training."""
    target_modules: Annotated[list[ModuleName], Meta(min_length=1)] | Literal["all-linear"] = (
        "all-linear"
    )
    """Linear layers that get an adapter: module names (a name matches the layers whose path
    ends with it, e.g. ``["q_proj", "v_proj"]``), or ``"all-linear"``: every linear layer but
    the LM head."""
    rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(rank)``."""


class _ModelCommon(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    dtype: Dtype = "float32"
    """Parameter dtype of the trainer's master weights and of the local server."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel; ``flash_attention_2`` needs flash-attn and a GPU."""
    lora: LoraConfig | None = None
    """``[model.lora]``: train LoRA adapters on the frozen model (absent: full fine-tuning)."""


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
    words: list[str] = []
    """Multi-character tokens (e.g. ``<tool_call>``), one id each after the alphabet: matched
    whole wherever they occur in text, and kept (unlike special tokens) when decoding."""


TokenizerConfig = PretrainedTokenizer | CharTokenizer
