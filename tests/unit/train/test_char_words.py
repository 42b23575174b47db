"""Word tokens of the built character tokenizer: one id each, kept in decoded text."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from nexrl_async.config.model import CharTokenizer
from nexrl_async.core.errors import ConfigError
from nexrl_async.train.build import build_char_tokenizer

CFG = CharTokenizer(alphabet="0123456789<>/_abclot", words=["<tool_call>", "</tool_call>"])


def test_words_are_single_tokens_that_decode_back(tmp_path: Path) -> None:
    tok = build_char_tokenizer(CFG)
    text = "<tool_call>12</tool_call>"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 4
    assert ids[0] == tok.convert_tokens_to_ids("<tool_call>") == len(tok) - 2
    assert tok.decode(ids, skip_special_tokens=True) == text
    # the characters still spell the word where a word is not wanted
    assert len(tok.encode("tool_call", add_special_tokens=False)) == len("tool_call")
    # a saved and reloaded tokenizer (what the RL stage reads) tokenizes the same way
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.encode(text, add_special_tokens=False) == ids
    assert again.decode(ids, skip_special_tokens=True) == text


def test_empty_words_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.words"):
        build_char_tokenizer(CharTokenizer(words=[""]))
