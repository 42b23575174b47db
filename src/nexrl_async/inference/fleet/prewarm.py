"""Warm local servers: started before the engine's own imports, handed their arguments at launch.

The engine and a launched local server each spend seconds importing torch and transformers
before they do anything; one after the other, a run waits for both. So ``nexrl-async run``
(rank 0, ``inference.backend = "local"``, ``inference.prewarm`` on) starts ``inference.servers``
server processes *first* (:func:`warm_local_servers`), as ``python -m
nexrl_async.inference.local --wait-for-args``: each imports the server stack, then blocks reading
one line from its stdin. When the fleet launches server ``i`` for the first time
(``ServerProcess.spawn``, attempt 0) it takes a warm process (:func:`take_warm`) instead of
spawning a fresh one, provided the fresh one would have been the same thing: this interpreter,
``-m nexrl_async.inference.local``, no extra environment. The handover
(:meth:`WarmServer.hand_over`) appends what the process printed so far to the server's log and
writes one JSON line: the argv and the log path; the process redirects its output to the log
and runs as if launched with that argv. Restarts always spawn fresh processes. Warm processes
that were never taken (a failed start, fewer servers launched) are killed when the ``with``
block ends, and a warm process whose stdin closes (its parent died) exits.

Like a launched server, a warm one runs in its own session (the fleet stops its process group)
and, on Linux, behind the parent-death shim (:mod:`~nexrl_async.core.shim`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import anyio
import msgspec
from loguru import logger

from nexrl_async.config.inference import InferenceConfig, LocalInference
from nexrl_async.core.handover import WAIT_FLAG, Handover
from nexrl_async.core.shim import shimmed

LOCAL_SERVER_MODULE = "nexrl_async.inference.local"

_POLL_S = 0.1
"""How often :meth:`WarmServer.wait` checks whether the process exited."""


class WarmServer:
    """One warm server process (a process-group leader, like a launched server)."""

    def __init__(self, popen: subprocess.Popen[bytes], early_log: BinaryIO) -> None:
        self._popen = popen
        self._early_log = early_log  # an unlinked temp file: the process's output until handover

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        """Wait for the process to exit; its exit code (polled: it is not an asyncio child)."""
        while True:  # no event to wait on: a Popen child, not the event loop's
            code = self._popen.poll()
            if code is not None:
                return code
            await anyio.sleep(_POLL_S)

    def hand_over(self, argv: Sequence[str], log_path: Path) -> None:
        """Append the early output to ``log_path``, then send the server its arguments."""
        self._early_log.seek(0)
        with log_path.open("ab") as log:
            log.write(self._early_log.read())
        self._early_log.close()
        stdin = self._popen.stdin
        assert stdin is not None  # spawned with stdin=PIPE
        stdin.write(msgspec.json.encode(Handover(argv=list(argv), log=str(log_path))) + b"\n")
        stdin.close()

    def early_output(self, max_bytes: int = 2000) -> str:
        """The last ``max_bytes`` the process printed before any handover."""
        self._early_log.seek(0, os.SEEK_END)
        self._early_log.seek(max(0, self._early_log.tell() - max_bytes))
        return self._early_log.read().decode(errors="replace")

    def discard(self) -> None:
        """Kill the process group and reap it (a warm process never handed over)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=10.0)
        if self._popen.stdin is not None:
            self._popen.stdin.close()
        self._early_log.close()


_pool: list[WarmServer] = []
"""This process's warm servers not taken yet (filled by :func:`warm_local_servers`)."""


def start_warm_server() -> WarmServer:
    """Spawn one warm local server (through the parent-death shim on Linux)."""
    early_log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by hand_over or discard
    argv = shimmed([sys.executable, "-m", LOCAL_SERVER_MODULE, WAIT_FLAG])
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=early_log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    return WarmServer(popen, early_log)


def warm_count(cfg: InferenceConfig, environ: Mapping[str, str] = os.environ) -> int:
    """How many warm servers ``nexrl-async run`` starts for ``cfg``: ``inference.servers`` for
    the local backend with ``prewarm`` on, in the process that runs the engine (rank 0); else 0."""
    if not isinstance(cfg, LocalInference) or not cfg.prewarm:
        return 0
    return cfg.servers if environ.get("RANK", "0") == "0" else 0


@contextlib.contextmanager
def warm_local_servers(count: int) -> Iterator[None]:
    """Start ``count`` warm servers for the fleet to take; kill the ones left over at the end."""
    warm = [start_warm_server() for _ in range(count)]
    _pool.extend(warm)
    try:
        yield
    finally:
        for server in warm:
            if server in _pool:
                _pool.remove(server)
                server.discard()


def take_warm(argv: Sequence[str], env: Mapping[str, str]) -> WarmServer | None:
    """A live warm server able to run ``argv`` (our local server on this interpreter, no added
    environment), removed from the pool; ``None`` when there is none."""
    if env or list(argv[:3]) != [sys.executable, "-m", LOCAL_SERVER_MODULE]:
        return None
    while _pool:
        server = _pool.pop(0)
        if server.returncode is None:
            return server
        logger.warning(
            "a warm local server exited early (code {}); launching a fresh one. Its output:\n{}",
            server.returncode,
            server.early_output(),
        )
        server.discard()
    return None
