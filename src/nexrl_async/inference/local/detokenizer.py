"""Token ids → text, incrementally per step and exactly at the end (torch thread).

Incremental decoding keeps two offsets into the ids: text is only extended once the newest ids
decode to whole characters (no trailing U+FFFD), so a multi-byte character split across tokens
never shows up half-decoded. Final texts are decoded in one piece and trimmed as SGLang's
detokenizer trims them: a matched stop token or stop string is cut unless ``no_stop_trim``.
"""

from __future__ import annotations

from collections.abc import Sequence

from nexrl_async.core.token_codec import TokenCodec
from nexrl_async.inference.local.step_plan import FinishReason


class IncrementalText:
    """Cumulative text of a growing list of ids, at O(window) cost per token."""

    def __init__(self, codec: TokenCodec, *, skip_special_tokens: bool) -> None:
        self._codec = codec
        self._skip = skip_special_tokens
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    def advance(self, ids: list[int]) -> str:
        """Extend with ``ids`` (the full list so far); returns the characters added."""
        prefix = self._decode(ids[self._prefix_offset : self._read_offset])
        current = self._decode(ids[self._prefix_offset :])
        if len(current) <= len(prefix) or current.endswith("\ufffd"):
            return ""
        added = current[len(prefix) :]
        self.text += added
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        return added

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return str(self._codec.decode(ids, skip_special_tokens=self._skip))


def find_stop(text: str, added: str, stops: tuple[str, ...]) -> str | None:
    """The stop string that now occurs in ``text`` (searching only where ``added`` can reach)."""
    if not stops or not added:
        return None
    longest = max(len(s) for s in stops)
    window = text[-(len(added) + longest - 1) :]
    for stop in stops:
        if stop and stop in window:
            return stop
    return None


class Ending:
    """A sequence's final text to produce: its ids, how it finished and its decoding flags."""

    __slots__ = ("finish", "no_stop_trim", "output_ids", "skip_special_tokens")

    def __init__(
        self,
        output_ids: list[int],
        finish: FinishReason | None,
        *,
        skip_special_tokens: bool,
        no_stop_trim: bool,
    ) -> None:
        self.output_ids = output_ids
        self.finish = finish
        self.skip_special_tokens = skip_special_tokens
        self.no_stop_trim = no_stop_trim

    def ids(self) -> list[int]:
        """The ids the text is decoded from: a matched stop token is cut unless kept."""
        matched = self.finish.get("matched") if self.finish else None
        if isinstance(matched, int) and not self.no_stop_trim and self.output_ids:
            return self.output_ids[:-1]
        return self.output_ids

    def trimmed(self, text: str) -> str:
        """``text`` cut at a matched stop string (unless kept)."""
        matched = self.finish.get("matched") if self.finish else None
        if isinstance(matched, str) and not self.no_stop_trim:
            cut = text.find(matched)
            if cut >= 0:
                return text[:cut]
        return text


def final_texts(codec: TokenCodec, endings: Sequence[Ending]) -> list[str]:
    """The response ``text`` of each finished (or aborted) sequence, decoded in one call per
    ``skip_special_tokens`` value."""
    texts = [""] * len(endings)
    ids = [e.ids() for e in endings]
    for skip in (True, False):
        picked = [i for i, e in enumerate(endings) if e.skip_special_tokens is skip and ids[i]]
        if picked:
            decoded = codec.decode_batch([ids[i] for i in picked], skip_special_tokens=skip)
            for i, text in zip(picked, decoded, strict=True):
                texts[i] = text
    return [e.trimmed(t) for e, t in zip(endings, texts, strict=True)]


def final_text(
    codec: TokenCodec,
    output_ids: list[int],
    finish: FinishReason | None,
    *,
    skip_special_tokens: bool,
    no_stop_trim: bool,
) -> str:
    """The response ``text`` of one finished (or aborted) sequence."""
    ending = Ending(
        output_ids, finish, skip_special_tokens=skip_special_tokens, no_stop_trim=no_stop_trim
    )
    return final_texts(codec, [ending])[0]
