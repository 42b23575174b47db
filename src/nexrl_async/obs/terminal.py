"""The terminal stream that log lines and the live progress line share.

On a TTY the progress line is drawn in place at the bottom (``\\r`` plus erase-line). A log line
written while it is shown would land on the same row, so every write goes through
:class:`Terminal`: it erases the status row, writes the text, and redraws the status row after
each complete line. Off a TTY there is no status row and writes pass straight through.

Writes come from the event-loop thread and from worker threads (loguru calls the sink from
whichever thread logs), so a lock orders them.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from typing import TextIO

_ERASE_LINE = "\r\x1b[2K"


class Terminal:
    """A text stream (``write``/``flush``/``isatty``) with one redrawable status row.

    ``stream`` defaults to ``sys.stderr`` as it is when the terminal is built (so pytest's
    capture applies). ``is_tty`` overrides the detection (tests force both modes).
    """

    def __init__(self, stream: TextIO | None = None, *, is_tty: bool | None = None) -> None:
        self._stream: TextIO = stream if stream is not None else sys.stderr
        self._tty = _detect_tty(self._stream) if is_tty is None else is_tty
        self._status = ""
        self._lock = threading.Lock()

    @property
    def stream(self) -> TextIO:
        return self._stream

    def isatty(self) -> bool:
        return self._tty

    def wants_color(self) -> bool:
        """Whether ANSI colours suit this terminal (a TTY, and ``NO_COLOR`` unset)."""
        return self._tty and not os.environ.get("NO_COLOR")

    def write(self, text: str) -> None:
        """Write ``text`` above the status row (which is redrawn after a complete line)."""
        with self._lock:
            if self._status:
                self._stream.write(_ERASE_LINE)
            self._stream.write(text)
            if self._status and text.endswith("\n"):
                self._stream.write(self._status)
            self._stream.flush()

    def flush(self) -> None:
        with self._lock:
            self._stream.flush()

    def show_status(self, line: str) -> None:
        """Draw ``line`` in place of the current status row (TTY only; a no-op otherwise)."""
        if not self._tty:
            return
        line = _fit_width(line)
        with self._lock:
            self._status = line
            self._stream.write(_ERASE_LINE + line)
            self._stream.flush()

    def clear_status(self, *, keep: bool = False) -> None:
        """Remove the status row; with ``keep`` leave its last text on screen as a plain line."""
        with self._lock:
            if not self._status:
                return
            self._stream.write("\n" if keep else _ERASE_LINE)
            self._stream.flush()
            self._status = ""


def _detect_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        # Closed or exotic streams (pytest capture, pipes) are not terminals.
        return False


def _fit_width(line: str) -> str:
    """Cut ``line`` to the terminal width so it never wraps (a wrapped row cannot be redrawn)."""
    width = shutil.get_terminal_size(fallback=(120, 24)).columns
    if len(line) < width:
        return line
    return line[: max(width - 2, 1)] + "…"
