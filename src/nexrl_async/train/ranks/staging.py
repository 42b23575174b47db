"""Weights handed from a trainer process to its parent through one shared-memory file.

```
child (trainer process)                         parent (the engine)
layout = writer.fill(trainer.named_parameters_for_sync())
                       ── layout (path, entries) ──▶
                                                views = reader.views(layout)  # [(name, tensor)]
```

On every weight sync the child copies each ``(name, tensor)`` of the stream into one file in
``/dev/shm`` (the system's temporary folder where there is none), at 64-byte aligned offsets;
the parent maps the same file once and reads the tensors in place, with no copy and no pickling.
A file is reused while the names, shapes and dtypes stay the same; otherwise the child writes a
new one. The parent deletes a file's name as soon as it has mapped it (the memory lives on
while either side maps it), so a crashed run leaves nothing behind in ``/dev/shm``.

The views stay valid until the next sync writes over them: read them before asking for the
next one (the engine's publisher does; every trainer call goes through one limiter).
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
    """Where a sync's tensors are: the file's path and size, and one entry per tensor."""

    path: str
    size: int
    entries: tuple[Entry, ...]

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
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class StagingWriter:
    """The trainer process's side: copies each sync's tensors into the shared file."""

    def __init__(self, prefix: str = "nexrl-weights") -> None:
        self._prefix = f"{prefix}-{os.getpid()}"
        self._layout: Layout | None = None
        self._buffer: mmap.mmap | None = None
        self._count = 0

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
        """Forget the file (its name too, if the parent has not taken it yet)."""
        if self._layout is not None:
            Path(self._layout.path).unlink(missing_ok=True)
        self._layout, self._buffer = None, None

    def _open(self, entries: tuple[Entry, ...], size: int) -> None:
        self.close()
        self._count += 1
        path = _folder() / f"{self._prefix}-{self._count}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._layout = Layout(path=str(path), size=size, entries=entries)


class StagingReader:
    """The parent's side: maps the file a layout names (once) and views its tensors."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._buffer: mmap.mmap | None = None

    def views(self, layout: Layout) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` per entry, reading the shared file in place."""
        if layout.path != self._path:
            self._buffer = _map(layout.path, layout.size)
            self._path = layout.path
            Path(layout.path).unlink(missing_ok=True)  # mapped on both sides: the name can go
        assert self._buffer is not None
        return [(entry.name, _view(self._buffer, entry)) for entry in layout.entries]

    def close(self) -> None:
        self._path, self._buffer = None, None
