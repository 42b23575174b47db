"""Server-sent events: a line-by-line decoder (no I/O) and the encoder the simulated server uses.

SGLang sends ``data: <json>`` events separated by blank lines and ends every stream with
``data: [DONE]``. The decoder follows the SSE rules that matter here: ``data`` fields of one
event are joined with newlines, comment lines (``:``) and other fields are ignored, an event is
dispatched at a blank line.
"""

from __future__ import annotations

DONE = "[DONE]"


class SSEDecoder:
    """Feed it lines (without their line ending); it returns each event's data when complete."""

    def __init__(self) -> None:
        self._data: list[str] = []

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
        return self.feed("")


def encode_event(data: str) -> bytes:
    """One ``data:`` event, terminated by a blank line."""
    return f"data: {data}\n\n".encode()
