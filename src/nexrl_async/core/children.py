"""Child processes that talk to the engine over a socket pair: forked early, or spawned.

```
with early_child(TRAINER_MODULE, serve, enabled=...):   # rank 0, before its event loop starts
    ...
    child = take_child(TRAINER_MODULE) or spawn_child(TRAINER_MODULE)
    conn = Connection(child.sock.detach())                # multiprocessing framing
```

A forked child is a copy of the engine taken before its event loop and any thread started
(:func:`early_child`): it has every module the engine imported, so it starts at once instead of
importing torch and transformers again (~6 s of CPU). Where forking is not safe (another thread
is running, or no ``fork`` on this platform) nothing is forked and the engine later spawns
``python -m MODULE FD`` behind the parent-death shim (:mod:`~nexrl_async.core.shim`).

Either way the child runs in a session of its own (a Ctrl-C reaches the engine, which decides
when its children stop), dies with the thread that made it (``PR_SET_PDEATHSIG`` on Linux: make
children from a thread that lives as long as the run) and waits for its first message on the
socket. A forked child closes the pipes and sockets it inherited (a warm server's stdin must see
its end of file when the engine closes it) and leaves with ``os._exit``. Children never taken
are killed when the ``early_child`` block ends. No torch here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from nexrl_async.core.shim import shimmed

TRAINER_MODULE = "nexrl_async.train.ranks.remote_main"
"""The trainer process's module (``trainer.process = true``)."""


class ChildProcess(Protocol):
    """What the engine uses of a child: ``subprocess.Popen``'s names."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


@dataclass
class Child:
    """A child process and the engine's end of its socket pair."""

    process: ChildProcess
    sock: socket.socket

    def discard(self) -> None:
        """Close our end (the child sees end of file) and kill the child."""
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class Forked:
    """A forked child, with the ``Popen`` methods the engine uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._code: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._code

    def poll(self) -> int | None:
        if self._code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        assert self._code is not None
        return self._code

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


_pool: dict[str, list[Child]] = {}


def spawn_child(module: str) -> Child:
    """Start ``python -m module FD`` now (imports everything afresh)."""
    ours, theirs = socket.socketpair()
    try:
        argv = shimmed([sys.executable, "-m", module, str(theirs.fileno())])
        process = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), start_new_session=True)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Child(process, ours)


def can_fork() -> bool:
    """Forking is safe here: Linux, and no thread but this one."""
    return sys.platform == "linux" and threading.active_count() == 1


def fork_child(serve: Callable[[int], int]) -> Child:
    """Fork; the child runs ``serve(fd)`` on its end of a socket pair and exits with its code.
    Only where :func:`can_fork`."""
    parent = os.getpid()
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            ours.close()
            _become_child(parent, keep=theirs.fileno())
            code = serve(theirs.detach())
        except BaseException:  # noqa: BLE001 - reported, then the child exits
            traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    return Child(Forked(pid), ours)


def _become_child(parent: int, *, keep: int) -> None:
    os.setsid()
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == keep:
            continue
        with contextlib.suppress(OSError):  # the listing's own fd, or already closed
            if stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)


@contextmanager
def early_child(module: str, serve: Callable[[int], int], *, enabled: bool) -> Iterator[None]:
    """Fork a child for :func:`take_child` (if ``enabled`` and :func:`can_fork`); discard it at
    the end unless taken."""
    child = fork_child(serve) if enabled and can_fork() else None
    if child is not None:
        _pool.setdefault(module, []).append(child)
    try:
        yield
    finally:
        if child is not None and child in _pool.get(module, []):
            _pool[module].remove(child)
            child.discard()


def take_child(module: str) -> Child | None:
    """A live child of ``module`` made early, removed from the pool; ``None`` when there is
    none."""
    pool = _pool.get(module, [])
    while pool:
        child = pool.pop(0)
        if child.process.poll() is None:
            return child
        child.discard()
    return None
