"""Tiny models and tokenizers built from the recipe (tests, the CPU demo).

Nothing here downloads anything: the tokenizer is assembled with the ``tokenizers`` library and
the model is a freshly initialised transformers architecture, seeded so that the same config and
seed always give the same weights.

```
tok = build_char_tokenizer(CharTokenizer(alphabet="0123456789+="))
model = build_model(BuiltModel(), vocab_size=len(tok), seed=0, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
save_model_dir(model, tok, "/tmp/tiny")       # an HF folder any server or trainer can load
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.core.errors import ConfigError

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _chat_template(bos: str, sep: str) -> str:
    """Every message's content followed by ``sep``, after one BOS; roles are not rendered."""
    return f"{bos}{{% for message in messages %}}{{{{ message['content'] }}}}{sep}{{% endfor %}}"


def build_char_tokenizer(cfg: CharTokenizer) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids ``0..`` are ``cfg.specials``, then one per character.

    ``specials`` are, in order, pad, bos, eos and (optionally) sep. ``words`` come after the
    alphabet: each is one token wherever it occurs in text and stays in decoded text (added
    tokens that are not special, like ``<tool_call>`` in Qwen's vocabulary). Encoding text
    prepends BOS (like Llama tokenizers) and drops characters outside the alphabet. The chat
    template renders ``<bos>`` then each message's content followed by ``<sep>`` (or ``<eos>``
    without a sep), so the model continues after the last separator.

    The alphabet must be ASCII. The model is a byte-level BPE without merges: one
    token per character, and the same tokenization whichever class ``AutoTokenizer`` picks for
    the saved folder (transformers loads ``qwen2`` folders with its byte-level Qwen2 tokenizer).
    """
    specials = list(cfg.specials)
    alphabet = list(dict.fromkeys(cfg.alphabet))
    if len(specials) < 3 or len(set(specials)) != len(specials):
        raise ConfigError(
            "tokenizer.specials needs distinct pad, bos and eos tokens", path="tokenizer.specials"
        )
    if not alphabet or any(not ch.isascii() or ch == "\x7f" for ch in alphabet):
        raise ConfigError(
            "tokenizer.alphabet must be non-empty ASCII (no DEL)", path="tokenizer.alphabet"
        )
    pad, bos, eos = specials[:3]
    sep = specials[3] if len(specials) > 3 else eos
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in alphabet:
        vocab[_byte_level(ch)] = len(vocab)
    core = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    words = [w for w in dict.fromkeys(cfg.words) if w not in vocab]
    if any(not w for w in words):
        raise ConfigError("tokenizer.words must not hold empty strings", path="tokenizer.words")
    core.add_tokens([AddedToken(w, special=False, normalized=False) for w in words])
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=pad,
        sep_token=sep,
        chat_template=cfg.chat_template or _chat_template(bos, sep),
        model_max_length=1_000_000,
        padding_side="left",
    )


def _byte_level(ch: str) -> str:
    """The byte-level (GPT-2) spelling of an ASCII character: controls and space move to
    ``U+0100 + code`` (``" "`` -> ``"Ġ"``), the rest spell themselves."""
    return chr(256 + ord(ch)) if ord(ch) < 33 else ch


def build_model_for(cfg: BuiltModel, tokenizer: Any, *, seed: int) -> PreTrainedModel:
    """:func:`build_model` sized to ``tokenizer`` (its length, pad, bos and eos ids)."""
    return build_model(
        cfg,
        vocab_size=len(tokenizer),
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(
    cfg: BuiltModel,
    *,
    vocab_size: int,
    seed: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
) -> PreTrainedModel:
    """A freshly initialised causal LM; the same ``cfg`` and ``seed`` give identical weights.

    The global torch RNG is left untouched (initialisation runs under a forked RNG state).
    """
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % kv_heads:
        raise ConfigError(
            "model: num_attention_heads must divide hidden_size and num_key_value_heads must "
            "divide num_attention_heads",
            path="model",
        )
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "attn_implementation": cfg.attn_implementation,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.architecture == "qwen2":
            model: PreTrainedModel = Qwen2ForCausalLM(Qwen2Config(**common))
        else:
            model = LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config = GenerationConfig(
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return torch.nn.Module.to(model, _TORCH_DTYPES[cfg.dtype]).eval()


def save_model_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path
) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` into the HF folder ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
