"""Child processes that talk to the engine over a socket pair, spawnable early.

```
with warm_children(TRAINER_MODULE, 1):           # `nexrl-async run`, before its own imports
    ...
    child = take_child(TRAINER_MODULE) or spawn_child(TRAINER_MODULE)
    conn = Connection(child.sock.detach())       # multiprocessing framing over the socket
```

A child is ``python -m MODULE FD`` (``FD``: its end of the pair) on this interpreter, behind the
parent-death shim (:mod:`~nexrl_async.core.shim`), in a session of its own (a Ctrl-C reaches
the engine, which decides when its children stop). Spawned at the start of ``nexrl-async run``,
its imports (torch, transformers) overlap the engine's; it then waits for its first message.
Children never taken are killed when the ``warm_children`` block ends. No torch here: the CLI
imports this before anything heavy.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from nexrl_async.core.shim import shimmed

TRAINER_MODULE = "nexrl_async.train.ranks.remote_main"
"""The trainer process's module (``trainer.process = true``)."""


@dataclass
class Child:
    """A spawned child and the engine's end of its socket pair."""

    process: subprocess.Popen[bytes]
    sock: socket.socket

    def discard(self) -> None:
        """Close our end (the child sees end of file) and kill the child."""
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


_pool: dict[str, list[Child]] = {}


def spawn_child(module: str) -> Child:
    """Start ``python -m module FD`` now (call it from a thread that outlives the run: on Linux
    the child is killed when the spawning thread exits)."""
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


@contextmanager
def warm_children(module: str, count: int) -> Iterator[None]:
    """Spawn ``count`` children of ``module`` for :func:`take_child`; discard the ones left."""
    warm = [spawn_child(module) for _ in range(count)]
    _pool.setdefault(module, []).extend(warm)
    try:
        yield
    finally:
        for child in warm:
            if child in _pool.get(module, []):
                _pool[module].remove(child)
                child.discard()


def take_child(module: str) -> Child | None:
    """A live warm child of ``module``, removed from the pool; ``None`` when there is none."""
    pool = _pool.get(module, [])
    while pool:
        child = pool.pop(0)
        if child.process.poll() is None:
            return child
        child.discard()
    return None
