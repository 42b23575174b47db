"""Untrusted Python in a subprocess: output, errors, and every limit enforced, nothing left over."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import psutil
import pytest

from nexrl_async.rollout.sandbox import python, run_python
from nexrl_async.rollout.tools import Tool


async def test_stdout_stdin_and_exit_code() -> None:
    result = await run_python("import sys\nprint('got', sys.stdin.read())", stdin="42")
    assert result.ok
    assert result.stdout == "got 42\n"
    assert result.stderr == ""


async def test_an_exception_is_a_failed_run_with_its_traceback() -> None:
    result = await run_python("raise ValueError('bad input')")
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
    result = await run_python(code, timeout_s=1.5)
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


async def test_the_cpu_limit_stops_a_busy_loop() -> None:
    result = await run_python("while True:\n    pass\n", timeout_s=30, cpu_s=1)
    assert not result.timed_out
    assert result.exit_code is not None
    assert result.exit_code < 0  # SIGXCPU, then SIGKILL at the hard limit
    assert result.describe().startswith("killed by SIG")


async def test_the_memory_limit_raises_memory_error() -> None:
    result = await run_python("x = bytearray(2 * 1024**3)", memory_mb=256)
    assert result.exit_code == 1
    assert "MemoryError" in result.stderr


async def test_the_file_size_limit_stops_large_writes() -> None:
    code = "open('big', 'wb').write(b'x' * (4 * 1024 * 1024))\nprint('wrote')"
    result = await run_python(code, file_mb=1)
    assert not result.ok
    assert "wrote" not in result.stdout


async def test_output_past_the_cap_is_dropped() -> None:
    result = await run_python("print('a' * 100000)\nprint('done')", max_output_bytes=1000)
    assert result.ok
    assert len(result.stdout) == 1000
    assert result.truncated


async def test_the_program_sees_neither_the_engine_environment_nor_its_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEXRL_SECRET_TOKEN", "do-not-leak")
    code = "import os\nprint(os.environ.get('NEXRL_SECRET_TOKEN'))\nprint(os.getcwd())"
    result = await run_python(code)
    secret, cwd = result.stdout.split()
    assert secret == "None"
    assert cwd != os.getcwd()
    assert not await anyio.Path(cwd).exists()  # the work folder is deleted afterwards


async def test_cancelling_the_call_kills_the_program(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"
    with anyio.move_on_after(1.0):
        await run_python(code, timeout_s=60)
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
