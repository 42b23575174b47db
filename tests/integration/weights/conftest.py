"""Local servers (subprocesses) on a tiny model, and the trainer-side pieces around them.

Servers run ``python -m nexrl_async serve --model DIR --port N --torch-threads 1`` and are
started together (their start-up overlaps), stopped by handle (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from nexrl_async.config.inference import AttachInference
from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.supervisor import Fleet, open_fleet
from nexrl_async.train.build import build_char_tokenizer, build_model_for, save_model_dir

API_KEY = "weights-key"
TINY = BuiltModel(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tok = build_char_tokenizer(CharTokenizer(alphabet="0123456789+-*= "))
    model = build_model_for(TINY, tok, seed=0)
    with torch.no_grad():  # larger weights: log-probs far from uniform
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(25.0)
    return model, tok


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tok = tiny()
    return save_model_dir(model, tok, tmp_path_factory.mktemp("weights_model") / "tiny")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_servers(model: Path, logs: Path, count: int) -> list[Server]:
    """``count`` servers started together; returns once all are healthy."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    servers = []
    for i in range(count):
        port, log = _free_port(), logs / f"server{i}.log"
        argv = [sys.executable, "-m", "nexrl_async", "serve", "--model", str(model)]
        argv += ["--port", str(port), "--torch-threads", "1", "--api-key", API_KEY]
        with log.open("wb") as sink:
            proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        servers.append(Server(proc, f"http://127.0.0.1:{port}", log))
    deadline = time.monotonic() + 240.0  # two start-ups on two busy shared cores
    pending = list(servers)
    while pending and time.monotonic() < deadline:
        for server in list(pending):
            if server.proc.poll() is not None:
                break
            try:
                if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                    pending.remove(server)
            except httpx.TransportError:
                pass
        else:
            time.sleep(0.2)
            continue
        break
    if pending:
        stop_all(servers)
        raise RuntimeError(f"server did not start:\n{pending[0].log.read_text()}")
    return servers


def stop_all(servers: list[Server]) -> None:
    """SIGTERM every live server at once, then wait for each (SIGKILL after 15 s)."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def pair(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """Two servers on the tiny model for a whole module (tests may kill them: last test)."""
    servers = start_servers(model_dir, tmp_path_factory.mktemp("pair"), 2)
    try:
        yield servers
    finally:
        stop_all(servers)


@asynccontextmanager
async def attached(
    servers: Sequence[Server], log_dir: Path
) -> AsyncIterator[tuple[Fleet, dict[str, SGLangClient], httpx.AsyncClient]]:
    """A fleet attached to ``servers``, a client per server, and a plain HTTP client."""
    fleet_cfg = AttachInference(urls=[s.url for s in servers], api_key=API_KEY, retries=0)
    async with (
        httpx.AsyncClient(timeout=None) as http,
        open_fleet(fleet_cfg, model_dir=log_dir, log_dir=log_dir, http=http) as fleet,
    ):
        yield fleet, {u: SGLangClient(u, http=http, api_key=API_KEY) for u in fleet.urls}, http
