"""The fleet against real server processes: launch, health, crash, restart, stop, no orphans.

Servers are ``stub_server.py`` (stdlib HTTP) launched through the ``command`` template, so these
tests exercise the real process, signal and HTTP paths in about 20 s on a laptop.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from nexrl_async.config.inference import AttachInference, SGLangInference
from nexrl_async.core.errors import ConfigError, EngineUnavailable
from nexrl_async.inference.fleet.launch import free_ports
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.inference.fleet.supervisor import open_fleet

STUB = Path(__file__).with_name("stub_server.py")
STUB_COMMAND = ["{python}", str(STUB), "--host", "{host}", "--port", "{port}"]


def stub_cfg(*extra: str, **fields: Any) -> SGLangInference:
    values: dict[str, Any] = {
        "python": sys.executable,
        "command": STUB_COMMAND,
        "extra_args": list(extra),
        "health_interval_s": 0.2,
        "health_timeout_s": 10.0,
        "restart_backoff_s": 0.05,
        "stop_grace_s": 2.0,
        "max_restarts": 2,
    }
    values.update(fields)
    return SGLangInference(**values)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs: trust kill(0)
    return state not in ("Z", "X")


async def wait_until(condition: Any, timeout_s: float) -> None:
    """Poll ``condition`` (process state has no event to wait on) until true, or fail."""
    with anyio.fail_after(timeout_s):
        while True:
            if condition():
                return
            await anyio.sleep(0.05)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


async def test_launches_routes_logs_and_stops(tmp_path: Path, http: httpx.AsyncClient) -> None:
    cfg = stub_cfg("--no-health-generate", servers=2)  # /health_generate 404 still counts healthy
    async with open_fleet(cfg, model_dir=tmp_path, log_dir=tmp_path / "logs", http=http) as fleet:
        pids = [pid for pid in fleet.pids if pid is not None]
        assert len(pids) == 2
        assert all(alive(pid) for pid in pids)
        assert len(set(fleet.urls)) == 2
        assert all(server.available for server in fleet.servers)
        seen = set()
        async with fleet.lease() as first, fleet.lease() as second:
            for server in (first, second):
                seen.add(server.index)
                assert (await http.get(f"{server.url}/health", timeout=5)).status_code == 200
        assert seen == {0, 1}  # least outstanding spreads two concurrent leases
    assert not any(alive(pid) for pid in pids)
    assert fleet.pids == [None, None]
    log = (tmp_path / "logs" / "server0.log").read_text()
    assert "=== nexrl_async: launch 0 of server 0" in log
    assert "stub server on 127.0.0.1" in log  # the server's stdout went to its log file
    assert "GET /health" in log  # and so did its stderr


async def test_the_callers_start_up_work_runs_while_the_servers_start(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    started: list[list[str]] = []

    def read_logs() -> list[str]:
        return [log.read_text() for log in sorted(tmp_path.glob("server*.log"))]

    async def while_starting() -> None:
        started.append(read_logs())

    cfg = stub_cfg("--no-health-generate", "--startup-delay", "0.5", servers=2)
    async with open_fleet(
        cfg, model_dir=tmp_path, log_dir=tmp_path, http=http, while_starting=while_starting
    ) as fleet:
        assert all(server.available for server in fleet.servers)
    [logs] = started  # once, with both processes launched and neither listening yet
    assert len(logs) == 2
    assert all("launch 0 of server" in log for log in logs)
    assert not any("stub server on" in log for log in logs)


async def test_sigkilled_server_is_restarted(tmp_path: Path, http: httpx.AsyncClient) -> None:
    calls: list[tuple[int, bool]] = []

    async def on_restart(server: ServerHandle) -> None:
        calls.append((server.index, server.available))
        server.weight_version = "3"

    cfg = stub_cfg()
    logs = tmp_path / "logs"
    async with open_fleet(
        cfg, model_dir=tmp_path, log_dir=logs, http=http, on_restart=on_restart
    ) as fleet:
        (server,) = fleet.servers
        old_pid = server.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: server.available is False, 5)
        await wait_until(lambda: server.available and server.pid not in (None, old_pid), 10)
        assert fleet.restart_count == 1
        assert server.restarts == 1
        assert calls == [(0, False)]  # the hook runs before the server is routed again
        assert server.weight_version == "3"
        async with fleet.lease() as leased:
            assert (await http.get(f"{leased.url}/health", timeout=5)).status_code == 200
        new_pid = server.pid
    assert new_pid is not None
    assert not alive(new_pid)
    assert not alive(old_pid)
    assert (logs / "server0.log").read_text().count("=== nexrl_async: launch") == 2


async def test_request_on_hung_server_fails_retryable(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with open_fleet(stub_cfg(), model_dir=tmp_path, log_dir=tmp_path, http=http) as fleet:
        (server,) = fleet.servers
        hung_pid = server.pid
        assert hung_pid is not None

        async def request_while_it_hangs() -> None:
            async with fleet.lease("group:0") as leased:
                os.kill(hung_pid, signal.SIGSTOP)  # accepts connections, never answers
                await http.get(f"{leased.url}/slow", timeout=120)

        with anyio.fail_after(15), pytest.raises(EngineUnavailable) as caught:
            await request_while_it_hangs()
        assert caught.value.retryable
        assert "went down during the request" in str(caught.value)
        with anyio.fail_after(10):
            await fleet.wait_healthy()
        assert server.pid != hung_pid
        assert not alive(hung_pid)  # the stopped server got SIGTERM + SIGCONT


async def test_cancelled_scope_leaves_no_process(tmp_path: Path, http: httpx.AsyncClient) -> None:
    command = [*STUB_COMMAND, "--ignore-term", "--child-pid-file", str(tmp_path / "child{port}")]
    cfg = stub_cfg(servers=2, command=command, stop_grace_s=0.5)
    pids: list[int] = []
    with anyio.fail_after(15), anyio.CancelScope() as scope:
        async with open_fleet(cfg, model_dir=tmp_path, log_dir=tmp_path, http=http) as fleet:
            assert fleet.specs is not None
            pids = [pid for pid in fleet.pids if pid is not None]
            pids += [int((tmp_path / f"child{spec.port}").read_text()) for spec in fleet.specs]
            assert len(pids) == 4
            assert all(alive(pid) for pid in pids)
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    # Servers ignoring SIGTERM got SIGKILL; their forked children (same process group) too.
    assert [pid for pid in pids if alive(pid)] == []


async def test_spent_restart_budget_names_server_and_log(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    crash = ["{python}", "-c", "import sys; print('boom', sys.argv[1]); sys.exit(3)", "{port}"]
    cfg = stub_cfg(command=crash, max_restarts=1)
    log = tmp_path / "logs" / "server0.log"
    expected = pytest.RaisesExc(
        EngineUnavailable, match=re.escape(str(log)) + ".*restart budget.*exited with code 3"
    )
    with anyio.fail_after(15), pytest.RaisesGroup(expected):
        async with open_fleet(cfg, model_dir=tmp_path, log_dir=tmp_path / "logs", http=http):
            pytest.fail("a server that always crashes never becomes ready")
    launches = re.findall(r"^boom \d+$", log.read_text(), flags=re.MULTILINE)
    assert len(launches) == 2  # first launch + one restart


async def test_attached_servers_are_watched_never_stopped(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    (port,) = free_ports("127.0.0.1", 1)
    argv = [sys.executable, str(STUB), "--host", "127.0.0.1", "--port", str(port)]
    server = await anyio.open_process(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cfg = AttachInference(
            urls=[f"http://127.0.0.1:{port}/"], health_interval_s=0.2, health_timeout_s=1.5
        )
        async with open_fleet(cfg, model_dir=tmp_path, log_dir=tmp_path, http=http) as fleet:
            assert fleet.urls == [f"http://127.0.0.1:{port}"]
            assert fleet.pids == [None]
        assert server.returncode is None  # the fleet does not stop what it did not launch
        expected = pytest.RaisesExc(EngineUnavailable, match="not healthy within 1.5s")
        with anyio.fail_after(15), pytest.RaisesGroup(expected):
            async with open_fleet(cfg, model_dir=tmp_path, log_dir=tmp_path, http=http):
                server.kill()
                await server.wait()
                await anyio.sleep_forever()
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()


FLEET_SCRIPT = """
import sys
from pathlib import Path

import anyio
import httpx

from nexrl_async.config.inference import SGLangInference
from nexrl_async.inference.fleet.supervisor import open_fleet


async def main() -> None:
    tmp = Path(sys.argv[1])
    command = ["{python}", sys.argv[2], "--host", "{host}", "--port", "{port}"]
    cfg = SGLangInference(python=sys.executable, command=command, health_interval_s=0.2)
    async with httpx.AsyncClient(trust_env=False) as http:
        async with open_fleet(cfg, model_dir=tmp, log_dir=tmp, http=http) as fleet:
            (tmp / "pids").write_text(" ".join(str(pid) for pid in fleet.pids))
            await anyio.sleep(60)


anyio.run(main)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
async def test_sigkilled_parent_leaves_no_server(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(FLEET_SCRIPT)
    argv = [sys.executable, str(script), str(tmp_path), str(STUB)]
    parent = await anyio.open_process(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        await wait_until(lambda: (tmp_path / "pids").exists() or parent.returncode, 20)
        pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
        assert all(alive(pid) for pid in pids)
        parent.kill()  # SIGKILL: the parent runs no cleanup at all
        await parent.wait()
        await wait_until(lambda: not any(alive(pid) for pid in pids), 5)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_missing_command_is_a_config_error(tmp_path: Path, http: httpx.AsyncClient) -> None:
    cfg = stub_cfg(python=str(tmp_path / "no-such-python"))
    with anyio.fail_after(5), pytest.RaisesGroup(pytest.RaisesExc(ConfigError, match="not found")):
        async with open_fleet(cfg, model_dir=tmp_path, log_dir=tmp_path, http=http):
            pytest.fail("nothing can be launched")


@pytest.mark.skipif(
    importlib.util.find_spec("nexrl_async.testing.simulated") is None,
    reason="the simulated SGLang server is not in the tree yet",
)
async def test_simulated_sglang_server_through_the_command_template(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    command = ["{python}", "-m", "nexrl_async.testing.simulated", "--host", "{host}"]
    cfg = stub_cfg(command=[*command, "--port", "{port}"], health_timeout_s=30.0)
    async with open_fleet(cfg, model_dir=tmp_path, log_dir=tmp_path, http=http) as fleet:
        (server,) = fleet.servers
        pid = server.pid
        assert pid is not None
        async with fleet.lease("g:0") as leased:
            assert (await http.get(f"{leased.url}/health", timeout=5)).status_code == 200
    assert not alive(pid)
