"""Untrusted Python in a jail with time, memory, CPU, process, disk and output limits.

Model-written code (a ``python`` tool, code-execution rewards) must not run in the engine's
process: a crash, a runaway loop or a memory bomb would take the run down, and it could read
the engine's secrets. :func:`run_python` runs a program in a fresh interpreter (``python -I``:
no user site, no ``PYTHON*`` variables) with a minimal environment, an empty working folder
that is gone afterwards, and ``setrlimit`` limits set before the program starts:

- address space (``memory_mb``): allocations past it raise ``MemoryError``;
- CPU seconds (``cpu_s``, default the wall limit): SIGXCPU, then SIGKILL;
- file size (``file_mb``): a larger write fails;
- wall clock (``timeout_s``): the program and its children are killed, ``timed_out`` is set.

Output past ``max_output_bytes`` per stream is dropped (``truncated``). Cancelling the call
kills the program too.

Two isolations (``isolation``):

- ``"namespaces"`` (the default where bubblewrap works, see :func:`isolation_available`): the
  program is jailed by :mod:`~nexrl_async.rollout.sandbox_bwrap` in its own user, PID, mount and
  network namespaces: it sees no host file but the read-only system and interpreter folders, no
  host process (the engine included), no network unless ``network=True``, writes only to a
  tmpfs of ``disk_mb``, may run ``max_processes`` processes, and nothing it starts outlives the
  call or the engine.
- ``"rlimits"``: the resource limits alone, in a host temporary folder and a new session whose
  process group is killed at the end. Not a boundary: the program can read and write whatever
  the engine's user can, reach the network, signal the engine and escape the group with
  ``setsid``. For trusted code, or machines without bubblewrap (``apt-get install bubblewrap``).

Without an explicit ``isolation``, a machine where bubblewrap does not work falls back to
``"rlimits"`` with a warning; asking for ``"namespaces"`` there raises
:class:`SandboxUnavailable` before anything runs.

:func:`python` is the ready-made tool: name it in a recipe as
``rollout.tools = ["nexrl_async.rollout.sandbox:python"]``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from typing import Literal, Protocol

import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream, Process
from loguru import logger
from msgspec import Struct

from nexrl_async.config.rollout import RolloutConfig
from nexrl_async.core.errors import ConfigError, RolloutError
from nexrl_async.rollout.sandbox_bwrap import (
    BOOT,
    Jail,
    environment,
    isolation_available,
    isolation_problem,
)

Isolation = Literal["namespaces", "rlimits"]

__all__ = [
    "Isolation",
    "SandboxResult",
    "SandboxUnavailable",
    "isolation_available",
    "isolation_problem",
    "python",
    "run_python",
]


_KILL_GRACE_S = 5.0


class SandboxUnavailable(RolloutError):
    """``isolation="namespaces"`` was asked for where bubblewrap cannot build the jail."""


class SandboxResult(Struct, frozen=True, kw_only=True):
    """How a sandboxed program ended."""

    exit_code: int | None
    """The process's exit status; negative: killed by that signal; ``None``: never reaped."""
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False
    """Some output was dropped past ``max_output_bytes``."""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """A one-line account of how it ended (for tool output and logs)."""
        if self.timed_out:
            return f"timed out after {self.duration_s:.1f} s"
        code = self.exit_code
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"


async def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    cpu_s: int | None = None,
    file_mb: int = 16,
    disk_mb: int = 64,
    max_processes: int = 64,
    max_output_bytes: int = 64 * 1024,
    network: bool = False,
    isolation: Isolation | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` of a fresh interpreter under the module's limits.

    ``disk_mb`` (the working folder's size), ``max_processes`` (threads included) and
    ``network`` hold in the ``"namespaces"`` isolation only. ``isolation=None`` picks it where
    bubblewrap works, else ``"rlimits"`` with a warning (see the module).
    """
    if min(timeout_s, memory_mb, disk_mb, max_processes, max_output_bytes) <= 0 or file_mb < 0:
        raise ValueError("sandbox limits must be positive")
    limits: dict[str, int | None] = {
        "RLIMIT_AS": memory_mb * 2**20,
        "RLIMIT_CPU": cpu_s if cpu_s is not None else max(1, int(timeout_s + 0.999)),
        "RLIMIT_FSIZE": file_mb * 2**20,
        "RLIMIT_CORE": 0,
    }
    if await _isolation(isolation) == "rlimits":
        launch: contextlib.AbstractAsyncContextManager[_Launch] = _folder(code, limits)
    else:
        # per user inside the jail's own user namespace, so it counts the program's processes
        limits["RLIMIT_NPROC"] = max_processes
        config = {"limits": limits}
        launch = _jail(Jail(code, BOOT, config, network=network, disk_mb=disk_mb))
    async with launch as spawn:
        return await _run(spawn, stdin, timeout_s, max_output_bytes)


async def _isolation(asked: Isolation | None) -> Isolation:
    """The isolation to use: as asked, or the strongest that works here."""
    if asked == "rlimits":
        return "rlimits"
    problem = await anyio.to_thread.run_sync(isolation_problem)
    if problem is None:
        return "namespaces"
    if asked == "namespaces":
        raise SandboxUnavailable(
            f"sandbox isolation 'namespaces' is not usable here: {problem}; install bubblewrap "
            "(apt-get install bubblewrap) or ask for isolation='rlimits'"
        )
    _warn_fallback(problem)
    return "rlimits"


@functools.cache
def _warn_fallback(problem: str) -> None:
    logger.warning(
        "sandbox: {}; untrusted code runs under resource limits only (not a security "
        "boundary); install bubblewrap for the namespace jail",
        problem,
    )


class _Launch(Protocol):
    """What :func:`_run` needs of a launch: a command line and the hooks around the process."""

    argv: list[str]
    cwd: str | None
    env: dict[str, str]
    pass_fds: Sequence[int]

    async def started(self, process: Process) -> None: ...

    def exit_code(self, returncode: int | None) -> int | None: ...


class _Folder:
    """The ``"rlimits"`` launch: the boot in a host temporary folder, in a new session."""

    pass_fds: Sequence[int] = ()

    def __init__(self, work: str, limits: dict[str, int | None]) -> None:
        self.argv = [sys.executable, "-I", "-c", BOOT, json.dumps({"limits": limits})]
        self.cwd: str | None = work
        self.env = environment(work)

    async def started(self, process: Process) -> None:
        del process

    def exit_code(self, returncode: int | None) -> int | None:
        return returncode


@contextlib.asynccontextmanager
async def _folder(code: str, limits: dict[str, int | None]) -> AsyncIterator[_Launch]:
    with tempfile.TemporaryDirectory(prefix="nexrl-sandbox-") as work:
        await anyio.Path(work, "main.py").write_text(code)
        yield _Folder(work, limits)


@contextlib.asynccontextmanager
async def _jail(jail: Jail) -> AsyncIterator[_Launch]:
    with jail:
        yield jail


async def _run(spawn: _Launch, stdin: str, timeout_s: float, cap: int) -> SandboxResult:
    """Start the launch, feed and drain it under the wall limit, and kill what is left."""
    start = time.perf_counter()
    process = await anyio.open_process(
        spawn.argv,
        cwd=spawn.cwd,
        env=spawn.env,
        pass_fds=spawn.pass_fds,
        start_new_session=True,
    )
    try:
        await spawn.started(process)
        out, err, timed_out = await _communicate(process, stdin, timeout_s, cap)
    finally:
        with anyio.CancelScope(shield=True):
            await _reap(process)
    return SandboxResult(
        exit_code=spawn.exit_code(process.returncode),
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        timed_out=timed_out,
        truncated=len(out) >= cap or len(err) >= cap,
        duration_s=time.perf_counter() - start,
    )


PYTHON_TOOL = "nexrl_async.rollout.sandbox:python"
"""The recipe reference of the ready :func:`python` tool."""
_TOOL_ISOLATION: dict[str, Isolation | None] = {"python": None}


def configure_tool(cfg: RolloutConfig) -> None:
    """Check and apply ``rollout.sandbox`` for the ready :func:`python` tool, when the recipe
    offers it: ``namespaces`` where bubblewrap does not work is refused up front.

    Blocking (a jailed no-op, once per process). Raises:
        ConfigError: at ``rollout.sandbox``, naming why isolation is not available.
    """
    if PYTHON_TOOL not in cfg.tools:
        return
    if cfg.sandbox == "namespaces" and (problem := isolation_problem()) is not None:
        raise ConfigError(
            f"rollout.tools offers the sandboxed python tool, but namespace isolation is not "
            f"available here: {problem}; install bubblewrap (apt-get install bubblewrap), or set "
            'rollout.sandbox = "rlimits" (resource limits only: the program can read and write '
            "what the engine can, and reach the network)",
            path="rollout.sandbox",
        )
    _TOOL_ISOLATION["python"] = cfg.sandbox


async def python(code: str) -> str:
    """Run a Python 3 program and return what it printed.

    The program runs in a fresh interpreter with no network guarantees, a 10 s time limit, 512 MB
    of memory and an empty working folder; print the values you need.
    """
    result = await run_python(code, isolation=_TOOL_ISOLATION["python"])
    parts = [result.stdout.rstrip()]
    if result.stderr.strip():
        parts.append(f"stderr:\n{result.stderr.rstrip()}")
    if not result.ok:
        parts.append(f"({result.describe()})")
    if result.truncated:
        parts.append("(output truncated)")
    return "\n".join(p for p in parts if p) or "(no output)"


async def _communicate(
    process: Process, stdin: str, timeout_s: float, cap: int
) -> tuple[bytes, bytes, bool]:
    out, err = bytearray(), bytearray()
    with anyio.move_on_after(timeout_s) as scope:
        async with anyio.create_task_group() as group:
            assert process.stdout is not None
            assert process.stderr is not None
            group.start_soon(_drain, process.stdout, out, cap)
            group.start_soon(_drain, process.stderr, err, cap)
            if process.stdin is not None:
                # the program may exit without reading its input
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await process.stdin.send(stdin.encode())
                    await process.stdin.aclose()
        await process.wait()
    return bytes(out), bytes(err), scope.cancelled_caught


async def _drain(stream: ByteReceiveStream, into: bytearray, cap: int) -> None:
    """Read ``stream`` to its end, keeping the first ``cap`` bytes."""
    async for chunk in stream:
        room = cap - len(into)
        if room > 0:
            into.extend(chunk[:room])


async def _reap(process: Process) -> None:
    """Kill the program's whole process group (children it left behind too), and wait for it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with anyio.move_on_after(_KILL_GRACE_S):
        await process.wait()
    await process.aclose()
