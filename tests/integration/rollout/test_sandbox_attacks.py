"""The namespace sandbox against what a hostile or careless model might run (issue 12, item 7).

One test per attack of the fault pass: each runs the Python a model could write through
``run_python(isolation="namespaces")`` and checks the engine's side: its files, environment,
processes, network and disk. Processes an attack starts carry a unique marker in their argv, so
a scan of the host's process table shows whether any outlived the call.

Everything here needs a working bubblewrap and skips with the reason where there is none
(``apt-get install bubblewrap``); the ``"rlimits"`` isolation keeps its tests in
``tests/unit/rollout/test_sandbox.py``.

Run: ``.venv/bin/pytest tests/integration/rollout/test_sandbox_attacks.py -q``
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from nexrl_async.rollout.sandbox import SandboxResult, isolation_problem, run_python

_PROBLEM = isolation_problem()
pytestmark = pytest.mark.skipif(
    _PROBLEM is not None, reason=f"the namespace sandbox is not usable here: {_PROBLEM}"
)

SECRET = "nexrl-secret-" + uuid.uuid4().hex


@pytest.fixture
def marker() -> str:
    """A string to put in the argv of every process an attack starts."""
    return "nexrl-attack-" + uuid.uuid4().hex


def _marked(marker: str) -> list[int]:
    """Live (not zombie) host processes with ``marker`` in their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(marker in a for a in cmdline):
            found.append(proc.pid)
    return found


async def _assert_none_left(marker: str) -> None:
    for _ in range(50):
        if not _marked(marker):
            return
        await anyio.sleep(0.1)
    assert _marked(marker) == [], "processes outlived the sandbox call"


async def jailed(code: str, **limits: Any) -> SandboxResult:
    return await run_python(code, isolation="namespaces", **limits)


def _sleeper(marker: str) -> str:
    """Python for a child that sleeps a minute with the marker in its argv."""
    return f"['/bin/sh', '-c', 'sleep 60; :', {marker!r}]"


# --- the 10 attacks the resource limits already contained -----------------------------------


async def test_memory_bomb() -> None:
    result = await jailed("x = bytearray(2 * 1024**3)", memory_mb=256)
    assert result.exit_code == 1
    assert "MemoryError" in result.stderr


async def test_cpu_burn() -> None:
    result = await jailed("while True:\n    pass\n", timeout_s=30, cpu_s=1)
    assert not result.timed_out
    assert result.describe().startswith("killed by SIG")  # SIGXCPU, then SIGKILL


async def test_sleep_forever(marker: str) -> None:
    code = f"import subprocess, time\nsubprocess.Popen({_sleeper(marker)})\ntime.sleep(600)"
    started = time.monotonic()
    result = await jailed(code, timeout_s=1.0)
    assert result.timed_out
    assert time.monotonic() - started < 10
    await _assert_none_left(marker)


async def test_output_flood() -> None:
    code = "import sys\nfor _ in range(1000):\n    sys.stdout.write('x' * 10000)\n"
    result = await jailed(code, max_output_bytes=4096)
    assert result.truncated
    assert len(result.stdout) == 4096


async def test_huge_file() -> None:
    result = await jailed(
        "open('big', 'wb').write(b'x' * (8 * 1024**2))\nprint('wrote')", file_mb=1
    )
    assert not result.ok
    assert "File too large" in result.stderr
    assert "wrote" not in result.stdout


async def test_fork_bomb_of_128_processes(marker: str) -> None:
    code = f"""
import subprocess
children = []
try:
    for _ in range(128):
        children.append(subprocess.Popen({_sleeper(marker)}))
except OSError as err:
    print("stopped:", type(err).__name__)
print(len(children))
"""
    result = await jailed(code, max_processes=32)
    assert "stopped: BlockingIOError" in result.stdout  # EAGAIN: RLIMIT_NPROC
    assert int(result.stdout.split()[-1]) < 32
    await _assert_none_left(marker)


async def test_background_children(marker: str) -> None:
    code = f"import subprocess\nsubprocess.Popen({_sleeper(marker)})\nprint('left it running')"
    started = time.monotonic()
    result = await jailed(code, timeout_s=30)
    assert result.ok
    assert not result.timed_out  # PID 1 of the jail ends with the program: the rest is killed
    assert time.monotonic() - started < 10
    await _assert_none_left(marker)


async def test_environment_is_bare(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXRL_SECRET_TOKEN", SECRET)
    result = await jailed("import json, os\nprint(json.dumps(dict(os.environ)))")
    env = json.loads(result.stdout)
    allowed = {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONIOENCODING", "OMP_NUM_THREADS", "PWD"}
    assert set(env) <= allowed
    assert SECRET not in result.stdout


async def test_segfault() -> None:
    result = await jailed("import ctypes\nctypes.string_at(0)")
    assert result.describe() == "killed by SIGSEGV"


async def test_thread_bomb() -> None:
    code = """
import threading, time
started = 0
try:
    for _ in range(10000):
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        started += 1
except RuntimeError as err:
    print("stopped:", err)
print(started)
"""
    result = await jailed(code, timeout_s=20)
    assert "stopped: can't start new thread" in result.stdout
    assert int(result.stdout.split()[-1]) < 10000


# --- the 8 attacks only the namespaces contain -----------------------------------------------


async def test_setsid_double_fork_is_killed(marker: str) -> None:
    code = f"""
import os, subprocess
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        subprocess.Popen({_sleeper(marker)})
    os._exit(0)
print("escaped?")
"""
    result = await jailed(code, timeout_s=30)
    assert result.ok
    await _assert_none_left(marker)


_ENGINE = """
import json, os, sys
import anyio
from nexrl_async.rollout.sandbox import run_python
code = sys.stdin.read().replace("ENGINE_PID", str(os.getpid()))
result = anyio.run(lambda: run_python(code, isolation="namespaces", timeout_s=20))
print(json.dumps({"stdout": result.stdout, "stderr": result.stderr}))
"""


async def _as_engine(code: str) -> dict[str, str]:
    """Run ``code`` from an engine in a subprocess with SECRET in its environment since exec."""
    env = {**os.environ, "NEXRL_SECRET_TOKEN": SECRET}
    done = await anyio.run_process(
        [sys.executable, "-c", _ENGINE], input=code.encode(), env=env, check=False
    )
    assert done.returncode == 0, done.stderr.decode()  # the engine lived to report the result
    result: dict[str, str] = json.loads(done.stdout)
    return result


async def test_engine_environment_through_proc_is_hidden() -> None:
    code = """
import glob, os
paths = [f"/proc/{os.getppid()}/environ", "/proc/ENGINE_PID/environ"]
for path in paths + glob.glob("/proc/*/environ"):
    try:
        print(path, open(path, "rb").read())
    except OSError as err:
        print(path, type(err).__name__)
"""
    result = await _as_engine(code)
    assert "/proc/ENGINE_PID/environ" not in result["stdout"]  # the pid was filled in
    assert "FileNotFoundError" in result["stdout"]  # the engine's pid does not exist in the jail
    assert SECRET not in result["stdout"] + result["stderr"]


async def test_killing_the_engine_is_refused() -> None:
    code = """
import os, signal
for pid in (os.getppid(), ENGINE_PID):
    try:
        os.kill(pid, signal.SIGKILL)
        print(pid, "sent")
    except OSError as err:
        print(pid, type(err).__name__)
"""
    result = await _as_engine(code)
    lines = result["stdout"].splitlines()
    assert lines[0] == "1 PermissionError"  # the parent is the jail's PID 1
    assert lines[1].endswith("ProcessLookupError")  # the engine is not in the jail's PID space


async def test_reading_host_files_is_impossible(tmp_path: Path) -> None:
    secret_file = tmp_path / "token.txt"
    secret_file.write_text(SECRET)
    targets = [str(secret_file), str(Path.cwd() / "pyproject.toml"), "/etc/passwd", "/root"]
    code = f"""
import os
for path in {targets!r}:
    try:
        print(path, open(path).read() if os.path.isfile(path) else os.listdir(path))
    except OSError as err:
        print(path, type(err).__name__)
"""
    result = await jailed(code)
    assert SECRET not in result.stdout
    for line in result.stdout.splitlines()[:3]:
        assert line.endswith("FileNotFoundError")


async def test_writing_host_files_is_impossible(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints" / "step_10" / "model.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    planted = tmp_path / "planted.txt"
    venv_file = Path(sys.prefix, "planted.txt")
    code = f"""
import os, shutil, subprocess
subprocess.run(["mount", "-o", "remount,rw", "/usr"], capture_output=True)
for action in (
    lambda: open({str(checkpoint)!r}, "wb").write(b"garbage"),
    lambda: shutil.rmtree({str(checkpoint.parent.parent)!r}),
    lambda: open({str(planted)!r}, "w").write("x"),
    lambda: open({str(venv_file)!r}, "w").write("x"),
    lambda: open("/usr/planted.txt", "w").write("x"),
):
    try:
        action()
        print("done")
    except OSError as err:
        print(type(err).__name__)
"""
    result = await jailed(code)
    assert "done" not in result.stdout, result.stdout
    assert _contents(checkpoint) == b"weights"
    assert _existing(planted, venv_file, Path("/usr/planted.txt")) == []


def _contents(path: Path) -> bytes:
    return path.read_bytes()


def _existing(*paths: Path) -> list[Path]:
    return [path for path in paths if path.exists()]


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    return server


async def test_network_connect_is_refused() -> None:
    with _listener() as server:
        port = server.getsockname()[1]
        code = f"""
import socket
for host in ("127.0.0.1", "8.8.8.8"):
    try:
        socket.create_connection((host, {port}), timeout=2).close()
        print(host, "connected")
    except OSError as err:
        print(host, type(err).__name__)
"""
        result = await jailed(code)
        assert "connected" not in result.stdout, result.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # no connection ever arrived


async def test_network_when_allowed_reaches_the_host() -> None:
    """The control for the test above: with ``network=True`` the same connect goes through."""
    with _listener() as server:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}))"
        result = await jailed(code, network=True)
        assert result.ok, result.stderr
        conn, _ = server.accept()
        conn.close()


async def test_listening_on_all_interfaces_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"""
import socket, time
server = socket.socket()
server.bind(("0.0.0.0", {port}))
server.listen()
print("listening")
time.sleep(3)
"""
    reached: list[bool] = []

    async def knock() -> None:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    reached.append(True)
            except OSError:
                pass
            await anyio.sleep(0.1)

    async with anyio.create_task_group() as group:
        group.start_soon(knock)
        result = await jailed(code)
        group.cancel_scope.cancel()
    assert result.stdout == "listening\n"  # the program did listen, in its own network
    assert reached == []


def _host_folders() -> set[Path]:
    """The ``"rlimits"`` isolation's work folders in the host's temporary folder."""
    return set(Path(tempfile.gettempdir()).glob("nexrl-sandbox-*"))


async def test_filling_the_disk_stops_at_the_cap() -> None:
    before = _host_folders()
    code = """
written = 0
try:
    for i in range(300):
        with open(f"chunk{i}", "wb") as f:
            f.write(b"x" * 1024**2)
        written += 1
except OSError as err:
    print(err.strerror)
print(written)
"""
    result = await jailed(code, disk_mb=32, file_mb=2)
    assert "No space left on device" in result.stdout
    assert int(result.stdout.split()[-1]) <= 32
    assert _host_folders() == before  # the jail's folder is a tmpfs, nothing lands on the disk


# --- the jail's own lifetime ------------------------------------------------------------------


async def test_cancelling_the_call_kills_the_jail(marker: str) -> None:
    code = f"import subprocess, time\nsubprocess.Popen({_sleeper(marker)})\ntime.sleep(600)"
    with anyio.move_on_after(1.5):
        await jailed(code, timeout_s=60)
    await _assert_none_left(marker)


async def test_the_jail_dies_with_the_engine(marker: str) -> None:
    code = f"import subprocess, time\nsubprocess.Popen({_sleeper(marker)})\ntime.sleep(600)"
    async with await anyio.open_process([sys.executable, "-c", _ENGINE]) as engine:
        assert engine.stdin is not None
        await engine.stdin.send(code.encode())
        await engine.stdin.aclose()
        for _ in range(100):
            if _marked(marker):
                break
            await anyio.sleep(0.1)
        assert _marked(marker), "the attack never started"
        engine.kill()  # SIGKILL: no cleanup code of the engine runs
        await engine.wait()
    await _assert_none_left(marker)  # --die-with-parent
