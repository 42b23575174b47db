"""An append-only JSON-lines file: one encoded object per line, flushed on every write.

Shared by the metrics log and the run ledger. Each line goes to the OS as soon as it is written,
so a killed run keeps everything it logged. A run killed mid-write may leave a torn last line;
reopening for append (resume) first ends that line, so the next record starts on a line of its
own. Readers skip torn lines (see :func:`iter_lines`). Files are never truncated.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from loguru import logger


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
        if _ends_torn(self.path):
            self._file.write(b"\n")
            self._file.flush()

    def write_line(self, data: bytes) -> None:
        """Append ``data`` (one JSON document, no newline) plus a newline, and flush."""
        with self._lock:
            if self._file is None:
                if not self._warned_closed:
                    self._warned_closed = True
                    logger.warning("{} is closed; dropping late records", self.path)
                return
            self._file.write(data + b"\n")
            self._file.flush()

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
