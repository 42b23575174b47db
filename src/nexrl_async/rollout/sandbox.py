"""Untrusted Python in a subprocess with time, memory, CPU and output limits.

Model-written code (a ``python`` tool, code-execution rewards) must not run in the engine's
process: a crash, a runaway loop or a memory bomb would take the run down, and it could read
the engine's secrets. :func:`run_python` runs a program in a fresh interpreter (``python -I``:
no user site, no ``PYTHON*`` variables) in its own session and an empty temporary folder that is
deleted afterwards, with a minimal environment and ``setrlimit`` limits set before the program
starts:

- address space (``memory_mb``): allocations past it raise ``MemoryError``;
- CPU seconds (``cpu_s``, default the wall limit): SIGXCPU, then SIGKILL;
- file size (``file_mb``): a larger write fails;
- wall clock (``timeout_s``): the whole process group is killed, ``timed_out`` is set.

Output past ``max_output_bytes`` per stream is dropped (``truncated``). Cancelling the call
kills the process group too. This is a resource sandbox, not a security boundary against a
determined attacker (no namespaces or seccomp); run untrusted workloads inside a container.

:func:`python` is the ready-made tool: name it in a recipe as
``rollout.tools = ["nexrl_async.rollout.sandbox:python"]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time

import anyio
from anyio.abc import ByteReceiveStream, Process
from msgspec import Struct

_BOOT = """\
import json, resource, sys, traceback
limits = json.loads(sys.argv[1])
for name, value in limits.items():
    if value is not None:
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, name), (value, hard))
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as f:
    source = f.read()
try:
    exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__file__": "main.py"})
except SystemExit:
    raise
except BaseException as err:  # the program's own traceback, without this bootstrap's frame
    traceback.print_exception(type(err), err, err.__traceback__.tb_next)
    sys.exit(1)
"""

_KILL_GRACE_S = 5.0


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
    max_output_bytes: int = 64 * 1024,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` of a fresh interpreter under the module's limits."""
    if timeout_s <= 0 or memory_mb <= 0 or file_mb < 0 or max_output_bytes <= 0:
        raise ValueError("sandbox limits must be positive")
    limits = {
        "RLIMIT_AS": memory_mb * 2**20,
        "RLIMIT_CPU": cpu_s if cpu_s is not None else max(1, int(timeout_s + 0.999)),
        "RLIMIT_FSIZE": file_mb * 2**20,
        "RLIMIT_CORE": 0,
    }
    with tempfile.TemporaryDirectory(prefix="nexrl-sandbox-") as work:
        await anyio.Path(work, "main.py").write_text(code)
        start = time.perf_counter()
        process = await anyio.open_process(
            [sys.executable, "-I", "-c", _BOOT, json.dumps(limits)],
            cwd=work,
            env=_environment(work),
            start_new_session=True,
        )
        try:
            out, err, timed_out = await _communicate(process, stdin, timeout_s, max_output_bytes)
        finally:
            with anyio.CancelScope(shield=True):
                await _reap(process)
    return SandboxResult(
        exit_code=process.returncode,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        timed_out=timed_out,
        truncated=len(out) >= max_output_bytes or len(err) >= max_output_bytes,
        duration_s=time.perf_counter() - start,
    )


async def python(code: str) -> str:
    """Run a Python 3 program and return what it printed.

    The program runs in a fresh interpreter with no network guarantees, a 10 s time limit, 512 MB
    of memory and an empty working folder; print the values you need.
    """
    result = await run_python(code)
    parts = [result.stdout.rstrip()]
    if result.stderr.strip():
        parts.append(f"stderr:\n{result.stderr.rstrip()}")
    if not result.ok:
        parts.append(f"({result.describe()})")
    if result.truncated:
        parts.append("(output truncated)")
    return "\n".join(p for p in parts if p) or "(no output)"


def _environment(work: str) -> dict[str, str]:
    """Nothing of the engine's environment but a PATH; HOME and TMPDIR point at the folder."""
    return {
        "PATH": os.defpath,
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
    }


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
