"""train/build.py: the char tokenizer round-trips through AutoTokenizer; models are seeded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.core.errors import ConfigError
from nexrl_async.train.build import build_char_tokenizer, build_model, save_model_dir


def test_char_tokenizer_ids_specials_and_chat_template() -> None:
    tok = build_char_tokenizer(CharTokenizer(alphabet="ab \n"))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    assert len(tok) == 8
    assert tok("ab\nb a").input_ids == [1, 4, 5, 7, 5, 6, 4]  # BOS prepended
    assert tok("axb").input_ids == [1, 4, 5]  # unknown characters are dropped
    assert tok.decode([1, 4, 6, 5, 2], skip_special_tokens=True) == "a b"
    messages = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<bos>ab<sep>b<sep>"


def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path: Path) -> None:
    tok = build_char_tokenizer(CharTokenizer(alphabet="0123456789+= "))
    model = build_model(
        BuiltModel(hidden_size=16, intermediate_size=32, num_attention_heads=2),
        vocab_size=len(tok),
        seed=0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    save_model_dir(model, tok, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "12 + 3 = 15"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
    assert len(loaded) == len(tok)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (2, 0, 1)
    chat = [{"role": "user", "content": "1+1="}]
    assert loaded.apply_chat_template(chat, tokenize=False) == "<bos>1+1=<sep>"
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )
    assert list(tmp_path.glob("*.safetensors"))


def _params(model: PreTrainedModel) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_build_model_is_seeded(architecture: str) -> None:
    cfg = BuiltModel(
        architecture=architecture,  # type: ignore[arg-type]
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        dtype="bfloat16",
    )
    state = torch.random.get_rng_state()
    first = build_model(cfg, vocab_size=20, seed=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    same = build_model(cfg, vocab_size=20, seed=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    other = build_model(cfg, vocab_size=20, seed=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert first.config.model_type == architecture
    assert first.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(_params(first), _params(same), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(_params(first), _params(other), strict=True))


def test_bad_configs_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        build_char_tokenizer(CharTokenizer(specials=["<pad>", "<bos>"]))
    with pytest.raises(ConfigError):
        build_char_tokenizer(CharTokenizer(alphabet="é"))
    with pytest.raises(ConfigError):
        build_model(
            BuiltModel(hidden_size=30, num_attention_heads=4),
            vocab_size=10,
            seed=0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
