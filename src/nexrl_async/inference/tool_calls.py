"""Tool calls in the Hermes / Qwen text format, parsed out of generated text.

Qwen2.5, Qwen3 and Hermes chat templates teach the model to call a tool by writing::

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

:class:`ToolCallStream` splits text into the content outside such blocks and the calls, both at
once (:func:`split_tool_calls`) and incrementally for streams (:meth:`ToolCallStream.feed`
with the text so far, then :meth:`ToolCallStream.finish`). The two agree: the deltas of a
stream add up to the content of the whole text.

Rules (strict: a block that is not a well-formed call stays text):

- a call is a closed ``<tool_call>...</tool_call>`` block whose body is a JSON object with a
  non-empty string ``name`` and ``arguments`` that is an object, a JSON string holding one, or
  absent/null (``{}``); ``parameters`` is accepted for ``arguments`` (older Hermes data);
- with ``allowed`` names given, a call to any other name is not a call;
- anything else (bad JSON, a missing name, an unclosed block at the end) is kept verbatim in
  the content;
- whitespace before a call block, and after the last one or at the start, is dropped;
  text that resumes after a call keeps the whitespace that came right after the block as the
  separator. So ``"Sure.\\n<tool_call>...</tool_call>\\n"`` leaves ``"Sure."``, and
  ``"Sure.\\n<tool_call>...</tool_call>\\nDone."`` leaves ``"Sure.\\nDone."``.

Pure Python: no tokenizer, no I/O. Used by the local server's OpenAI route
(``inference/local/openai_format.py``); the rollout's own agent loop parses leniently
(``rollout/tools.py``: an unclosed block counts there, and errors go back to the model).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import msgspec

START = "<tool_call>"
END = "</tool_call>"


class ParsedCall(msgspec.Struct, frozen=True, kw_only=True):
    """One well-formed call: the tool's name and its arguments as a JSON object string."""

    name: str
    arguments: str
    """JSON text of the arguments object (what OpenAI's ``function.arguments`` holds)."""


class SplitText(msgspec.Struct, frozen=True, kw_only=True):
    """Text split into what lies outside the call blocks and the calls, in order."""

    content: str
    calls: list[ParsedCall]


def parse_call(body: str, allowed: Collection[str] | None = None) -> ParsedCall | None:
    """The call a block's body (the text between the tags) holds, or ``None`` if malformed."""
    try:
        raw = json.loads(body)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not name or (allowed is not None and name not in allowed):
        return None
    arguments: Any = raw.get("arguments", raw.get("parameters"))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else None
        except ValueError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Incremental splitter: feed it the whole text so far, get the new content and calls.

    Content is held back while it might still turn into a call: an open block without its
    end tag, a tail that could be the start of ``<tool_call>``, and trailing whitespace (it is
    dropped if a call follows).
    """

    def __init__(self, allowed: Collection[str] | None = None) -> None:
        self.allowed = None if allowed is None else frozenset(allowed)
        self.calls: list[ParsedCall] = []
        self._pos = 0
        """Characters of the text already decided (sent as content, or a call)."""
        self._space = ""
        """Whitespace decided as text but held back: sent before more text, dropped before a
        call."""
        self._after_call = False
        """The last thing decided was a call (the whitespace after it is a separator at most)."""
        self._emitted = False
        """Some content was sent (only then does whitespace after a call separate)."""

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        """``text`` is everything generated so far (it only grows): the content that is now
        certain, and the calls completed since the last feed."""
        out: list[str] = []
        new: list[ParsedCall] = []
        while True:
            start = text.find(START, self._pos)
            if start < 0:
                self._text(out, text[self._pos : len(text) - _partial_tag(text, self._pos)])
                break
            end = text.find(END, start + len(START))
            if end < 0:
                self._text(out, text[self._pos : start])
                break
            self._text(out, text[self._pos : start])
            call = parse_call(text[start + len(START) : end], self.allowed)
            block_end = end + len(END)
            if call is None:
                self._text(out, text[start:block_end])
            else:
                self._space, self._after_call = "", True
                new.append(call)
                self.calls.append(call)
            self._pos = block_end
        return "".join(out), new

    def finish(self, text: str) -> tuple[str, list[ParsedCall]]:
        """The last content and calls once ``text`` is final: what was held back is text now
        (an unclosed block, a partial tag); trailing whitespace is kept unless a call was the
        last thing."""
        delta, new = self.feed(text)
        rest = text[self._pos :]
        self._pos = len(text)
        tail = "" if self._after_call and not rest else self._space + rest
        self._space = ""
        return delta + tail, new

    def _text(self, out: list[str], piece: str) -> None:
        """Decide ``piece`` (the text right after what is decided) as content."""
        if not piece:
            return
        self._pos += len(piece)
        if self._after_call:
            rest = piece.lstrip()
            if self._emitted:
                self._space += piece[: len(piece) - len(rest)]
            piece = rest
            if not piece:
                return
            self._after_call = False
        body = piece.rstrip()
        if body:
            out.append(self._space + body)
            self._space = ""
            self._emitted = True
        self._space += piece[len(body) :]


def _partial_tag(text: str, start: int) -> int:
    """Length of the longest tail of ``text[start:]`` that is a proper prefix of ``<tool_call>``."""
    for size in range(min(len(START) - 1, len(text) - start), 0, -1):
        if START.startswith(text[len(text) - size :]):
            return size
    return 0


def split_tool_calls(text: str, allowed: Collection[str] | None = None) -> SplitText:
    """``text`` split at once: the content outside the call blocks, and the calls."""
    stream = ToolCallStream(allowed)
    content, _ = stream.finish(text)
    return SplitText(content=content, calls=list(stream.calls))
