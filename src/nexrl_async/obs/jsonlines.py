"""An append-only JSON-lines file: one encoded object per line, flushed on write.

Shared by the metrics log and the run ledger. A line goes to the OS as soon as it is written,
so a killed run keeps everything it logged, unless the writer asked for a ``lazy`` write (the
ledger's per-sample events): a lazy line goes out with the next flushed line, or once
:data:`LAZY_FLUSH_S` have passed since the last flush, or at close, so a killed run loses at most
the lazy lines of its last moments. A run killed mid-write may leave a torn last line;
reopening for append (resume) first ends that line, so the next record starts on a line of its
own. Readers skip torn lines (see :func:`iter_lines`). Files are never truncated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from loguru import logger

LAZY_FLUSH_S = 0.25
"""The longest a lazily written line waits in the buffer while lines keep coming."""


class JsonlWriter:
    """Appends pre-encoded JSON lines to ``path`` (created with its parent folders).

    :meth:`write_line` is safe to call from several threads at once: a lock keeps lines whole.
    Writing after :meth:`close` drops the line with one warning (late events during shutdown
    must not crash the run).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = self.path.open("ab")
        self._lock = threading.Lock()
        self._warned_closed = False
        self._flushed_at = time.monotonic()
        if _ends_torn(self.path):
            self._file.write(b"\n")
            self._file.flush()

    def write_line(self, data: bytes, *, lazy: bool = False) -> None:
        """Append ``data`` (one JSON document, no newline) plus a newline, and flush (a ``lazy``
        line: only if :data:`LAZY_FLUSH_S` have passed since the last flush)."""
        with self._lock:
            if self._file is None:
                if not self._warned_closed:
                    self._warned_closed = True
                    logger.warning("{} is closed; dropping late records", self.path)
                return
            self._file.write(data + b"\n")
            now = time.monotonic()
            if not lazy or now - self._flushed_at >= LAZY_FLUSH_S:
                self._file.flush()
                self._flushed_at = now

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    @property
    def closed(self) -> bool:
        return self._file is None


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, line)`` for every non-blank line of ``path`` (1-based numbers)."""
    with Path(path).open("rb") as file:
        for number, line in enumerate(file, start=1):
            stripped = line.strip()
            if stripped:
                yield number, stripped


def _ends_torn(path: Path) -> bool:
    """Whether a non-empty file's last byte is not a newline (a write was cut short)."""
    with path.open("rb") as file:
        file.seek(0, 2)
        if file.tell() == 0:
            return False
        file.seek(-1, 2)
        return file.read(1) != b"\n"
