"""Token ids → text, incrementally per step and exactly at the end (torch thread).

Incremental decoding keeps two offsets into the ids: text is only extended once the newest ids
decode to whole characters (no trailing U+FFFD), so a multi-byte character split across tokens
never shows up half-decoded. Final texts are decoded in one piece and trimmed as SGLang's
detokenizer trims them: a matched stop token or stop string is cut unless ``no_stop_trim``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from nexrl_async.inference.local.step_plan import FinishReason


class IncrementalText:
    """Cumulative text of a growing list of ids, at O(window) cost per token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, skip_special_tokens: bool) -> None:
        self._tok = tokenizer
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
        return str(self._tok.decode(ids, skip_special_tokens=self._skip))


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


def final_text(
    tokenizer: PreTrainedTokenizerBase,
    output_ids: list[int],
    finish: FinishReason | None,
    *,
    skip_special_tokens: bool,
    no_stop_trim: bool,
) -> str:
    """The response ``text`` of a finished (or aborted) sequence."""
    matched = finish.get("matched") if finish else None
    ids = output_ids
    if isinstance(matched, int) and not no_stop_trim and ids:
        ids = ids[:-1]
    text = str(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)) if ids else ""
    if isinstance(matched, str) and not no_stop_trim:
        cut = text.find(matched)
        if cut >= 0:
            text = text[:cut]
    return text
