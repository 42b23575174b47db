"""TokenCodec: the Rust shortcuts give exactly what the tokenizer's own methods give."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nexrl_async.config.model import CharTokenizer
from nexrl_async.core.token_codec import TokenCodec
from nexrl_async.train.build import build_char_tokenizer

TEXTS = ["<bos>12<sep>", "3+4=7", "", "<tool_call>9 9</tool_call>", "x?12", "<eos><pad>1"]


def _tokenizer() -> PreTrainedTokenizerBase:
    return build_char_tokenizer(
        CharTokenizer(alphabet="0123456789+= ", words=["<tool_call>", "</tool_call>"])
    )


def _rows(tok: PreTrainedTokenizerBase) -> list[list[int]]:
    rows = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    return [*rows, [2, 5, 6], [0, 0, 1], list(range(len(tok)))]


def _check_same(codec: TokenCodec, tok: PreTrainedTokenizerBase) -> None:
    for text in TEXTS:
        assert codec.encode(text) == list(tok.encode(text, add_special_tokens=False))
    rows = _rows(tok)
    for skip in (True, False):
        want = [tok.decode(r, skip_special_tokens=skip) for r in rows]
        assert [codec.decode(r, skip_special_tokens=skip) for r in rows] == want
        assert codec.decode_batch(rows, skip_special_tokens=skip) == want


def test_fast_tokenizer_goes_to_rust_with_the_same_results() -> None:
    tok = _tokenizer()
    codec = TokenCodec(tok)
    assert codec.direct == (True, True)
    _check_same(codec, tok)


def test_a_saved_and_reloaded_tokenizer_gives_the_same_results(tmp_path: Path) -> None:
    _tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    _check_same(TokenCodec(tok), tok)


def test_cleanup_of_spaces_keeps_the_tokenizers_own_decode() -> None:
    tok = _tokenizer()
    tok.clean_up_tokenization_spaces = True
    codec = TokenCodec(tok)
    assert codec.direct == (True, False)
    _check_same(codec, tok)


def test_truncation_in_the_rust_tokenizer_keeps_the_tokenizers_own_encode() -> None:
    tok = _tokenizer()
    tok._tokenizer.enable_truncation(max_length=2)
    codec = TokenCodec(tok)
    assert codec.direct == (False, True)
    assert codec.encode("12345") == list(tok.encode("12345", add_special_tokens=False))
    assert len(codec.encode("12345")) == 5


class _Custom:
    """Not a transformers tokenizer: its own methods are always used."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(text)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return f"{len(ids)}:{skip_special_tokens}"


@pytest.mark.parametrize("skip", [True, False])
def test_other_tokenizers_use_their_own_methods(skip: bool) -> None:
    codec = TokenCodec(_Custom())
    assert codec.direct == (False, False)
    assert codec.encode("abc") == [3]
    assert codec.decode_batch([[1, 2], [3]], skip_special_tokens=skip) == [f"2:{skip}", f"1:{skip}"]
