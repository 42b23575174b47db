"""Exact shortcuts past a HF fast tokenizer's Python layer, for the per-sample hot path.

transformers' ``encode``/``decode`` on a fast tokenizer end in the Rust ``tokenizers.Tokenizer``
behind it (``tokenizer._tokenizer``) after several layers of Python: on the CPU demo's tokenizer
~40 µs an encode (which goes through ``encode_batch``, dropping and re-taking the GIL, so it also
waits for any other thread) and ~7 µs a decode, against ~10 and ~1.3 µs for the Rust calls, and
~0.3 ms against ~2 ms for decoding a step's 256 responses in one call.

:class:`TokenCodec` calls Rust directly only where that is exactly what transformers computes
(checked once, from the tokenizer's class and settings; no transformers import here):

- decode: transformers' own ``decode``/``_decode`` (not overridden by a subclass) and no
  ``clean_up_tokenization_spaces``;
- encode: transformers' own ``encode``/``_encode_plus``, no truncation or padding configured in
  the Rust tokenizer (transformers turns them off per call), and its special-token splitting as
  the tokenizer's ``split_special_tokens`` asks.

Anything else (slow tokenizers, custom subclasses, cleanup on) goes through the tokenizer's own
methods, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_OWN_DECODE = {"PreTrainedTokenizerBase.decode"}
_OWN_INNER_DECODE = {"TokenizersBackend._decode", "PreTrainedTokenizerFast._decode"}
_OWN_ENCODE = {"PreTrainedTokenizerBase.encode"}
_OWN_INNER_ENCODE = {"TokenizersBackend._encode_plus"}


def _qualname(cls: type, name: str) -> str:
    return str(getattr(getattr(cls, name, None), "__qualname__", ""))


class TokenCodec:
    """``encode``/``decode``/``decode_batch`` of ``tokenizer``, through Rust where exact."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        cls = type(tokenizer)
        plain = backend is not None and hasattr(backend, "decode_batch")
        self._decoder = (
            backend
            if plain
            and _qualname(cls, "decode") in _OWN_DECODE
            and _qualname(cls, "_decode") in _OWN_INNER_DECODE
            and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
            else None
        )
        self._encoder = (
            backend
            if plain
            and _qualname(cls, "encode") in _OWN_ENCODE
            and _qualname(cls, "_encode_plus") in _OWN_INNER_ENCODE
            and getattr(backend, "truncation", None) is None
            and getattr(backend, "padding", None) is None
            and bool(getattr(backend, "encode_special_tokens", False))
            == bool(getattr(tokenizer, "split_special_tokens", False))
            else None
        )

    @property
    def direct(self) -> tuple[bool, bool]:
        """Whether ``(encode, decode)`` go straight to Rust."""
        return self._encoder is not None, self._decoder is not None

    def encode(self, text: str) -> list[int]:
        """``tokenizer.encode(text, add_special_tokens=False)`` as a list."""
        if self._encoder is not None:
            return list(self._encoder.encode(text, add_special_tokens=False).ids)
        out = self.tokenizer.encode(text, add_special_tokens=False)
        return list(out.tolist() if hasattr(out, "tolist") else out)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=...)`` (what the tokenizer's own method
        returns, unchecked, where it is used)."""
        if self._decoder is not None:
            return str(self._decoder.decode(list(ids), skip_special_tokens=skip_special_tokens))
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def decode_batch(
        self, rows: Sequence[Sequence[int]], *, skip_special_tokens: bool
    ) -> list[str]:
        """:meth:`decode` of every row, in one call where it goes to Rust."""
        if self._decoder is not None:
            texts = self._decoder.decode_batch(
                [list(r) for r in rows], skip_special_tokens=skip_special_tokens
            )
            return [str(t) for t in texts]
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]
