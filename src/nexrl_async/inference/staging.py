"""Weights handed between processes of one host through one shared-memory file.

```
writer (the trainer process, or the engine)      readers (the engine, local servers)
layout = writer.fill(trainer.named_parameters_for_sync())
                       ── layout (path, token, entries) ──▶
                                                views = reader.views(layout)  # [(name, tensor)]
```

On every fill the writer copies each ``(name, tensor)`` into one file in ``/dev/shm`` (the
system's temporary folder where there is none), at 64-byte aligned offsets; a reader maps the
same file once and reads the tensors in place, with no copy and no pickling. A file is reused
while the names, shapes and dtypes stay the same; otherwise the writer makes a new one (a new
``token``: readers map it again).

The file has no name: the writer removes it as soon as it is created and keeps it open, and the
layout's path is ``/proc/<writer pid>/fd/<fd>``, which any process of the same user opens while
the writer lives. So a crashed run leaves nothing behind in ``/dev/shm``, and any number of
readers (every local server, a server relaunched mid-run) can map it. Where ``/proc`` has no
file descriptors (not Linux) the name stays until the writer closes.

The views stay valid until the next fill writes over them: read them before asking for the next
one (the engine's publisher does; every trainer call goes through one limiter).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import msgspec
import torch
from torch import Tensor

_ALIGN = 64


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One tensor of the file: its name, dtype (``float32``), shape and byte offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int


class Layout(msgspec.Struct, frozen=True):
    """Where a fill's tensors are: the file's path, size and token, and one entry per tensor.

    ``token`` names the file for as long as it lives (the path's descriptor number can be
    reused by a later file)."""

    path: str
    size: int
    entries: tuple[Entry, ...]
    token: str

    @property
    def nbytes(self) -> int:
        """The tensors' bytes (without alignment padding)."""
        total = 0
        for entry in self.entries:
            count = 1
            for dim in entry.shape:
                count *= dim
            total += count * _dtype(entry.dtype).itemsize
        return total

    def same_tensors(self, entries: tuple[Entry, ...]) -> bool:
        return self.entries == entries


def _folder() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def _view(buffer: mmap.mmap, entry: Entry) -> Tensor:
    count = 1
    for dim in entry.shape:
        count *= dim
    if count == 0:
        return torch.empty(entry.shape, dtype=_dtype(entry.dtype))
    flat = torch.frombuffer(buffer, dtype=_dtype(entry.dtype), count=count, offset=entry.offset)
    return flat.view(entry.shape)


def _plan(tensors: list[tuple[str, Tensor]]) -> tuple[tuple[Entry, ...], int]:
    entries, offset = [], 0
    for name, tensor in tensors:
        entries.append(
            Entry(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset)
        )
        offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return tuple(entries), max(offset, _ALIGN)


def _map(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < size:
            raise ValueError(f"staging file {path} is smaller than its layout's {size} bytes")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class StagingWriter:
    """The writing side: copies each fill's tensors into the shared file."""

    def __init__(self, prefix: str = "nexrl-weights") -> None:
        self._prefix = f"{prefix}-{os.getpid()}"
        self._layout: Layout | None = None
        self._buffer: mmap.mmap | None = None
        self._fd: int | None = None
        self._named: Path | None = None
        self._count = 0

    @property
    def layout(self) -> Layout | None:
        """The last fill's layout."""
        return self._layout

    def fill(self, named: Iterable[tuple[str, Tensor]]) -> Layout:
        """Copy every ``(name, tensor)`` of ``named`` into the file; its layout."""
        tensors = [(name, tensor.detach()) for name, tensor in named]
        entries, size = _plan(tensors)
        if self._layout is None or not self._layout.same_tensors(entries):
            self._open(entries, size)
        assert self._buffer is not None
        assert self._layout is not None
        for entry, (_, tensor) in zip(entries, tensors, strict=True):
            if tensor.numel():
                _view(self._buffer, entry).copy_(tensor)
        return self._layout

    def close(self) -> None:
        """Close the file (and remove its name where it still has one)."""
        if self._fd is not None:
            os.close(self._fd)
        if self._named is not None:
            self._named.unlink(missing_ok=True)
        self._layout, self._buffer, self._fd, self._named = None, None, None, None

    def _open(self, entries: tuple[Entry, ...], size: int) -> None:
        self.close()
        self._count += 1
        path = _folder() / f"{self._prefix}-{self._count}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._buffer = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd = fd
        shared = f"/proc/{os.getpid()}/fd/{fd}"
        if os.path.exists(shared):
            path.unlink()
        else:
            shared, self._named = str(path), path
        token = f"{self._prefix}-{self._count}"
        self._layout = Layout(path=shared, size=size, entries=entries, token=token)


class StagingReader:
    """A reading side: maps the file a layout names (once per file) and views its tensors."""

    def __init__(self) -> None:
        self._token: str | None = None
        self._buffer: mmap.mmap | None = None

    def views(self, layout: Layout) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` per entry, reading the shared file in place.

        Raises:
            OSError: the file cannot be opened (its writer exited).
            ValueError: the file is smaller than the layout says, or a dtype is unknown.
        """
        if layout.token != self._token or self._buffer is None:
            self._buffer = _map(layout.path, layout.size)
            self._token = layout.token
        buffer = self._buffer
        return [(entry.name, _view(buffer, entry)) for entry in layout.entries]

    def close(self) -> None:
        self._token, self._buffer = None, None
