"""A real vLLM (CPU) server on a tiny model saved here; skipped without ``NEXRL_VLLM_PYTHON``.

``nox -s vllm`` builds the cached vLLM venv (``nox -s vllm_env``) and points
``NEXRL_VLLM_PYTHON`` at its interpreter. Everything here speaks raw HTTP (docs/vllm.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).parent
STARTUP_DEADLINE_S = 420.0
"""vLLM takes about 50 s to come up on a quiet 2-core machine, several minutes on a busy one."""


def _vllm_python() -> tuple[str | None, str]:
    """The interpreter from ``NEXRL_VLLM_PYTHON`` if it can find ``vllm``; else why not."""
    python = os.environ.get("NEXRL_VLLM_PYTHON", "")
    if not python:
        return None, "NEXRL_VLLM_PYTHON is not set (run `nox -s vllm`)"
    if not os.access(python, os.X_OK):
        return None, f"NEXRL_VLLM_PYTHON={python} is not an executable"
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        return None, f"NEXRL_VLLM_PYTHON={python} has no vllm"
    return python, ""


VLLM_PYTHON, SKIP_REASON = _vllm_python()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test of this folder when there is no working vLLM interpreter."""
    if VLLM_PYTHON is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(skip)


@dataclass(frozen=True)
class VLLMServer:
    url: str
    model_dir: Path
    process: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def save_tiny_model(path: Path) -> Path:
    """A float32 Qwen2 (hidden 128, 2 layers, 2 heads of 64) with a 43-token char tokenizer.

    Untied embeddings: on vLLM's CPU backend a disk reload does not refresh a tied LM head.
    """
    from nexrl_async.config.model import BuiltModel, CharTokenizer
    from nexrl_async.train.build import build_char_tokenizer, build_model, save_model_dir

    tok = build_char_tokenizer(CharTokenizer(alphabet="0123456789+=abcdefghijklmnopqrstuvwxyz "))
    cfg = BuiltModel(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = build_model(
        cfg,
        vocab_size=len(tok),
        seed=0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return save_model_dir(model, tok, path)


def vllm_argv(python: str, model_dir: Path, port: int) -> list[str]:
    """The launch line of docs/vllm.md."""
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "64",
        "--enforce-eager",
        "--enable-scale-out",
        "--seed",
        "0",
    ]


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_SERVER_DEV_MODE="1",  # /pause, /resume, /collective_rpc, weight routes
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache
        VLLM_HTTP_TIMEOUT_KEEP_ALIVE="60",  # above httpx's 5 s keep-alive expiry
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.pop("OMP_NUM_THREADS", None)  # vLLM sets its own thread binding
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server's process group (API server, engine core, worker), then kill."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # engine and worker may outlive the leader
            os.killpg(process.pid, signal.SIGKILL)
        return


def _wait_healthy(server: VLLMServer, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    with httpx.Client(timeout=5.0) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                tail = server.log.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"vLLM exited with {server.process.returncode}:\n{tail}")
            try:
                if http.get(f"{server.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    tail = server.log.read_text(errors="replace")[-4000:]
    raise RuntimeError(f"vLLM not healthy after {deadline_s:.0f} s:\n{tail}")


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """One vLLM server for the whole folder, on a fresh free port; stopped by handle at the end."""
    assert VLLM_PYTHON is not None
    root = tmp_path_factory.mktemp("vllm")
    model_dir = save_tiny_model(root / "model")
    port = _free_port()
    log = root / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            vllm_argv(VLLM_PYTHON, model_dir, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=vllm_env(),
            cwd=root,
            start_new_session=True,
        )
    server = VLLMServer(f"http://127.0.0.1:{port}", model_dir, process, log)
    try:
        _wait_healthy(server, STARTUP_DEADLINE_S)
        yield server
    finally:
        _stop(process)
