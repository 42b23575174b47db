"""A tiny model on disk and the local server running on it as a subprocess.

The server is started with ``python -m nexrl_async serve`` (= ``nexrl-async serve``) on a free
port, with one torch thread and an API key, and stopped by its handle (SIGTERM, then SIGKILL)
at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import PreTrainedModel

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.train.build import build_char_tokenizer, build_model_for, save_model_dir

API_KEY = "test-key"
TINY = BuiltModel(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
ALPHABET = "0123456789+-*= "


def tiny_model(seed: int) -> tuple[PreTrainedModel, object]:
    tok = build_char_tokenizer(CharTokenizer(alphabet=ALPHABET))
    model = build_model_for(TINY, tok, seed=seed)
    # Larger weights than the default init so that greedy outputs vary with the seed.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(25.0)
    return model, tok


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny models with the same architecture and different weights (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for seed in (0, 1):
        model, tok = tiny_model(seed)
        dirs.append(save_model_dir(model, tok, root / f"seed{seed}"))  # type: ignore[arg-type]
    return dirs[0], dirs[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return int(self.proc.returncode)


def start_server(model_dir: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    # the user-facing command (``nexrl-async serve``), as ``python -m nexrl_async serve``
    argv = [sys.executable, "-m", "nexrl_async", "serve", "--model", str(model_dir)]
    argv += ["--port", str(port), "--api-key", API_KEY, "--torch-threads", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become healthy:\n{log.read_text()}")


@pytest.fixture(scope="session")
def server(
    model_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    running = start_server(model_dirs[0], tmp_path_factory.mktemp("logs") / "server.log")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``launch(model_dir, *extra_args)`` starts a dedicated server, stopped after the test."""
    started: list[Server] = []

    def run(model_dir: Path, *extra: str) -> Server:
        started.append(start_server(model_dir, tmp_path / f"server{len(started)}.log", *extra))
        return started[-1]

    try:
        yield run
    finally:
        for one in started:
            one.stop()


@pytest.fixture(scope="module")
def launch_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """As ``launch``, for servers shared by the tests of one module."""
    logs = tmp_path_factory.mktemp("shared-logs")
    started: list[Server] = []

    def run(model_dir: Path, *extra: str) -> Server:
        started.append(start_server(model_dir, logs / f"server{len(started)}.log", *extra))
        return started[-1]

    try:
        yield run
    finally:
        for one in started:
            one.stop()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30.0) as c:
        yield c


@pytest.fixture
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
