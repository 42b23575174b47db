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
``token``: readers map it again). A writer with two buffers alternates between two files.

The file has no name: the writer removes it as soon as it is created and keeps it open, and the
layout's path is ``/proc/<writer pid>/fd/<fd>``, which any process of the same user opens while
the writer lives. So a crashed run leaves nothing behind in ``/dev/shm``, and any number of
readers (every local server, a server relaunched mid-run) can map it. Where ``/proc`` has no
file descriptors (not Linux) the name stays until the writer closes.

The views stay valid until the next fill writes over them (with two buffers: the fill after
next): read them before asking for more (the engine's publisher does).
"""

from __future__ import annotations

import math
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
        return sum(math.prod(e.shape) * _dtype(e.dtype).itemsize for e in self.entries)

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
    count = math.prod(entry.shape)
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


class _File:
    """One staging file: its layout, mapping and descriptor (and name, where it keeps one)."""

    def __init__(self, path: Path, entries: tuple[Entry, ...], size: int, token: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.buffer = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self.fd: int | None = fd
        self.named: Path | None = None
        shared = f"/proc/{os.getpid()}/fd/{fd}"
        if os.path.exists(shared):
            path.unlink()
        else:
            shared, self.named = str(path), path
        self.layout = Layout(path=shared, size=size, entries=entries, token=token)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.named is not None:
            self.named.unlink(missing_ok=True)


class StagingWriter:
    """The writing side: copies each fill's tensors into the shared file.

    With ``buffers = 2`` fills alternate between two files, so a fill's views stay valid until
    the fill after next: readers may still be copying one version while the next is written.
    """

    def __init__(self, prefix: str = "nexrl-weights", *, buffers: int = 1) -> None:
        if buffers not in (1, 2):
            raise ValueError(f"buffers must be 1 or 2, not {buffers}")
        self._prefix = f"{prefix}-{os.getpid()}"
        self._files: list[_File | None] = [None] * buffers
        self._turn = 0
        self._count = 0

    def fill(self, named: Iterable[tuple[str, Tensor]]) -> Layout:
        """Copy every ``(name, tensor)`` of ``named`` into the file; its layout."""
        tensors = [(name, tensor.detach()) for name, tensor in named]
        entries, size = _plan(tensors)
        file = self._files[self._turn]
        if file is None or not file.layout.same_tensors(entries):
            if file is not None:
                file.close()
            self._count += 1
            path = _folder() / f"{self._prefix}-{self._count}"
            file = _File(path, entries, size, token=f"{self._prefix}-{self._count}")
            self._files[self._turn] = file
        for entry, (_, tensor) in zip(entries, tensors, strict=True):
            if tensor.numel():
                _view(file.buffer, entry).copy_(tensor)
        self._turn = (self._turn + 1) % len(self._files)
        return file.layout

    def close(self) -> None:
        """Close the files (and remove their names where they still have one)."""
        for file in self._files:
            if file is not None:
                file.close()
        self._files = [None] * len(self._files)


class StagingReader:
    """A reading side: maps the files layouts name (once per file, the last two kept) and
    views their tensors."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, list[tuple[str, Tensor]]]] = {}

    def views(self, layout: Layout) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` per entry, reading the shared file in place.

        Raises:
            OSError: the file cannot be opened (its writer exited).
            ValueError: the file is smaller than the layout says, or a dtype is unknown.
        """
        known = self._maps.get(layout.token)
        if known is None:  # a file's views alias it: they are made once and show every fill
            buffer = _map(layout.path, layout.size)
            known = (buffer, [(entry.name, _view(buffer, entry)) for entry in layout.entries])
            if len(self._maps) >= 2:
                del self._maps[next(iter(self._maps))]
            self._maps[layout.token] = known
        return list(known[1])

    def close(self) -> None:
        self._maps = {}
