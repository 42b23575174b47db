"""Warm local servers (``inference/fleet/prewarm.py``): real processes, real local servers.

A warm server imports the server stack before the fleet launches it; the fleet's first launch
of a local server takes it (same pid, its early output and then the server's in the log);
restarts spawn fresh processes; warm servers never taken die with the ``with`` block, and one
whose parent closes its stdin exits on its own.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from loguru import logger

from nexrl_async.config.inference import LocalInference, SGLangInference
from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.inference.fleet import prewarm
from nexrl_async.inference.fleet.prewarm import (
    start_warm_server,
    take_warm,
    warm_count,
    warm_local_servers,
)
from nexrl_async.inference.fleet.supervisor import open_fleet
from nexrl_async.train.build import build_char_tokenizer, build_model_for, save_model_dir

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups, /proc")

LOCAL = [sys.executable, "-m", "nexrl_async.inference.local"]


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = build_char_tokenizer(CharTokenizer(alphabet="0123456789"))
    tiny = BuiltModel(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    model = build_model_for(tiny, tok, seed=0)
    return save_model_dir(model, tok, tmp_path_factory.mktemp("warm") / "model")  # type: ignore[arg-type]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


def local_cfg(**fields: object) -> LocalInference:
    values: dict[str, object] = {
        "health_interval_s": 0.2,
        "health_timeout_s": 60.0,
        "restart_backoff_s": 0.05,
        "stop_grace_s": 5.0,
        "extra_args": ["--torch-threads", "1"],
    }
    values.update(fields)
    return LocalInference(**values)  # type: ignore[arg-type]


async def test_the_first_launch_takes_the_warm_server_and_a_restart_spawns_fresh(
    tmp_path: Path, model_dir: Path, http: httpx.AsyncClient
) -> None:
    logs = tmp_path / "logs"
    with warm_local_servers(1):
        warm_pid = prewarm._pool[0].pid
        async with open_fleet(local_cfg(), model_dir=model_dir, log_dir=logs, http=http) as fleet:
            assert fleet.pids == [warm_pid]
            assert prewarm._pool == []
            url = fleet.servers[0].url
            assert (await http.get(f"{url}/health")).status_code == 200
            os.kill(warm_pid, signal.SIGKILL)
            with anyio.fail_after(60):
                while True:  # the supervisor restarts it; no event to wait on
                    if fleet.pids[0] not in (None, warm_pid) and fleet.servers[0].available:
                        break
                    await anyio.sleep(0.1)
            assert (await http.get(f"{url}/health")).status_code == 200
    log = (logs / "server0.log").read_text()
    assert "=== nexrl_async: warm start 0 of server 0: " in log
    assert "=== nexrl_async: launch 1 of server 0: " in log
    first = log.split("launch 1 of server 0")[0]
    assert "listening on port" in first  # the warm process's own output went to the log
    assert "--api-key" not in first or "--api-key=***" in first


async def test_warm_servers_never_taken_are_killed_at_the_end() -> None:
    with warm_local_servers(2):
        pids = [server.pid for server in prewarm._pool]
        assert all(not gone(pid) for pid in pids)
    assert prewarm._pool == []
    assert all(gone(pid) for pid in pids)


async def test_a_warm_server_exits_when_its_stdin_closes_without_arguments() -> None:
    server = start_warm_server()
    try:
        assert server._popen.stdin is not None
        server._popen.stdin.close()
        with anyio.fail_after(60):
            assert await server.wait() == 0
    finally:
        server.discard()


async def test_a_warm_server_that_died_is_skipped_with_a_warning() -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        with warm_local_servers(1):
            dead = prewarm._pool[0]
            os.kill(dead.pid, signal.SIGKILL)
            with anyio.fail_after(10):
                await dead.wait()
            assert take_warm([*LOCAL, "--model", "m"], {}) is None
            assert prewarm._pool == []
    finally:
        logger.remove(sink)
    assert any("warm local server exited early (code -9)" in line for line in lines)


def test_only_our_local_server_with_no_added_environment_is_taken() -> None:
    with warm_local_servers(1):
        assert take_warm(["python", "-m", "nexrl_async.inference.local"], {}) is None
        assert take_warm([*LOCAL, "--model", "m"], {"CUDA_VISIBLE_DEVICES": "0"}) is None
        assert take_warm([sys.executable, "-m", "sglang.launch_server"], {}) is None
        assert len(prewarm._pool) == 1
        taken = take_warm([*LOCAL, "--model", "m"], {})
        assert taken is not None
        taken.discard()


def test_warm_count_local_rank0_with_prewarm_only() -> None:
    assert warm_count(LocalInference(servers=3), {}) == 3
    assert warm_count(LocalInference(servers=3), {"RANK": "0"}) == 3
    assert warm_count(LocalInference(servers=3), {"RANK": "1"}) == 0
    assert warm_count(LocalInference(prewarm=False), {}) == 0
    assert warm_count(SGLangInference(), {}) == 0
