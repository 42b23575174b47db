"""Server-sent events: a line-by-line decoder (no I/O) and the encoder the simulated server uses.

SGLang sends ``data: <json>`` events separated by blank lines and ends every stream with
``data: [DONE]``. The decoder follows the SSE rules that matter here: ``data`` fields of one
event are joined with newlines, comment lines (``:``) and other fields are ignored, an event is
dispatched at a blank line.
"""

from __future__ import annotations

import re

DONE = "[DONE]"
_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Feed it body text (:meth:`feed_text`) or single lines without their ending
    (:meth:`feed`); it returns each event's data once the event is complete."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._pending = ""

    def feed_text(self, text: str) -> list[str]:
        """Decoded body text as it arrives (any split) → the data of every event it completes.

        A trailing carriage return is held back in case its line feed comes next.
        """
        buffer = self._pending + text
        events: list[str] = []
        start = 0
        for match in _LINE_END.finditer(buffer):
            if match.group() == "\r" and match.end() == len(buffer):
                break
            event = self.feed(buffer[start : match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
        self._pending = buffer[start:]
        return events

    def feed(self, line: str) -> str | None:
        """The data of the event this line completes, or ``None``."""
        if not line:
            if not self._data:
                return None
            data = "\n".join(self._data)
            self._data.clear()
            return data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """Data of an event the stream ended without a trailing blank line for."""
        if self._pending:
            self.feed(self._pending.rstrip("\r"))
            self._pending = ""
        return self.feed("")


def encode_event(data: str) -> bytes:
    """One ``data:`` event, terminated by a blank line."""
    return f"data: {data}\n\n".encode()
