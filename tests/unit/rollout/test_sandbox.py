"""Untrusted Python in a subprocess: output, errors, and every limit enforced, nothing left over.

Each test runs under both isolations (``namespaces`` skips where bubblewrap does not work); the
ones that watch the program from the host through a pid file are ``rlimits`` only, their
namespace twins are in ``tests/integration/rollout/test_sandbox_attacks.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import psutil
import pytest

from nexrl_async.rollout.sandbox import (
    Isolation,
    SandboxUnavailable,
    isolation_available,
    isolation_problem,
    python,
    run_python,
)
from nexrl_async.rollout.tools import Tool

_NO_JAIL = pytest.mark.skipif(
    not isolation_available(), reason=f"no namespace sandbox here: {isolation_problem()}"
)


@pytest.fixture(params=["rlimits", pytest.param("namespaces", marks=_NO_JAIL)])
def isolation(request: pytest.FixtureRequest) -> Isolation:
    mode: Isolation = request.param
    return mode


async def test_stdout_stdin_and_exit_code(isolation: Isolation) -> None:
    code = "import sys\nprint('got', sys.stdin.read())"
    result = await run_python(code, stdin="42", isolation=isolation)
    assert result.ok
    assert result.stdout == "got 42\n"
    assert result.stderr == ""


async def test_an_exception_is_a_failed_run_with_its_traceback(isolation: Isolation) -> None:
    result = await run_python("raise ValueError('bad input')", isolation=isolation)
    assert not result.ok
    assert result.exit_code == 1
    assert "ValueError: bad input" in result.stderr
    assert result.stderr.startswith('Traceback (most recent call last):\n  File "main.py", line 1')
    assert result.describe() == "exit code 1"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_the_wall_limit_kills_the_program_and_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "while True:\n    time.sleep(0.05)\n"
    )
    started = time.monotonic()
    result = await run_python(code, timeout_s=1.5, isolation="rlimits")
    assert result.timed_out
    assert not result.ok
    assert result.describe().startswith("timed out after")
    assert time.monotonic() - started < 10
    child = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(child):
            break
        await anyio.sleep(0.1)
    assert not _alive(child)


async def test_the_cpu_limit_stops_a_busy_loop(isolation: Isolation) -> None:
    code = "while True:\n    pass\n"
    result = await run_python(code, timeout_s=30, cpu_s=1, isolation=isolation)
    assert not result.timed_out
    assert result.exit_code is not None
    assert result.exit_code < 0  # SIGXCPU, then SIGKILL at the hard limit
    assert result.describe().startswith("killed by SIG")


async def test_the_memory_limit_raises_memory_error(isolation: Isolation) -> None:
    result = await run_python("x = bytearray(2 * 1024**3)", memory_mb=256, isolation=isolation)
    assert result.exit_code == 1
    assert "MemoryError" in result.stderr


async def test_the_file_size_limit_stops_large_writes(isolation: Isolation) -> None:
    code = "open('big', 'wb').write(b'x' * (4 * 1024 * 1024))\nprint('wrote')"
    result = await run_python(code, file_mb=1, isolation=isolation)
    assert not result.ok
    assert "wrote" not in result.stdout


async def test_output_past_the_cap_is_dropped(isolation: Isolation) -> None:
    code = "print('a' * 100000)\nprint('done')"
    result = await run_python(code, max_output_bytes=1000, isolation=isolation)
    assert result.ok
    assert len(result.stdout) == 1000
    assert result.truncated


async def test_the_program_sees_neither_the_engine_environment_nor_its_folder(
    monkeypatch: pytest.MonkeyPatch, isolation: Isolation
) -> None:
    monkeypatch.setenv("NEXRL_SECRET_TOKEN", "do-not-leak")
    code = "import os\nprint(os.environ.get('NEXRL_SECRET_TOKEN'))\nprint(os.getcwd())"
    result = await run_python(code, isolation=isolation)
    secret, cwd = result.stdout.split()
    assert secret == "None"
    assert cwd != os.getcwd()
    assert not await anyio.Path(cwd).exists()  # the work folder is deleted afterwards


async def test_cancelling_the_call_kills_the_program(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"
    with anyio.move_on_after(1.0):
        await run_python(code, timeout_s=60, isolation="rlimits")
    pid = int(pid_file.read_text())
    assert not _alive(pid)


async def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="sandbox limits must be positive"):
        await run_python("pass", timeout_s=0)


async def test_the_python_tool_reports_output_errors_and_limits() -> None:
    tool = Tool(python)
    assert tool.name == "python"
    assert tool.schema["function"]["parameters"]["required"] == ["code"]
    assert await python("print(6 * 7)") == "42"
    failed = await python("print('partial')\n1 / 0")
    assert failed.startswith("partial\nstderr:\n")
    assert "ZeroDivisionError" in failed
    assert failed.endswith("(exit code 1)")
    assert await python("x = 1") == "(no output)"


async def test_asking_for_namespaces_where_they_do_not_work_fails_up_front(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("nexrl_async.rollout.sandbox.isolation_problem", lambda: "no bwrap")
    with pytest.raises(SandboxUnavailable, match="'namespaces' is not usable here: no bwrap"):
        await run_python("print('never runs')", isolation="namespaces")
    fallback = await run_python("print('ran')")  # unasked: the resource limits alone
    assert fallback.stdout == "ran\n"


def test_the_probe_says_why_a_jail_does_not_work(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = isolation_problem.__wrapped__  # uncached
    monkeypatch.setattr("nexrl_async.rollout.sandbox_bwrap.bwrap", lambda: None)
    assert probe() == "bwrap (bubblewrap) is not installed"
    monkeypatch.setattr("nexrl_async.rollout.sandbox_bwrap.bwrap", lambda: "/bin/false")
    assert probe() == "a jailed no-op failed: exit code 1"
