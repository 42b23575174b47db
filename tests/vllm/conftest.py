"""A real vLLM (CPU) server on a tiny model saved here; skipped without ``NEXRL_VLLM_PYTHON``.

``nox -s vllm`` builds the cached vLLM venv (``nox -s vllm_env``) and points
``NEXRL_VLLM_PYTHON`` at its interpreter. The server is launched once for the session by the
engine's own fleet (``inference.backend = "vllm"``, ``fleet.launch.vllm_command``); the
protocol tests speak raw HTTP to it (docs/vllm.md), the RL tests go through ``VLLMClient``,
the publisher and the fleet.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from nexrl_async.config.inference import VLLMInference
from nexrl_async.inference.client.http import Http, open_http_pool
from nexrl_async.inference.client.vllm import VLLMClient
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.inference.fleet.supervisor import Fleet, open_fleet
from nexrl_async.weights import Publisher

HERE = Path(__file__).parent
CONTEXT = 512
"""The tiny model's context: room for generations long enough to pause mid-sequence on a busy
machine (tests/vllm/test_vllm_rl.py)."""
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


@dataclass
class LiveFleet:
    """A fleet of one vLLM server launched by ``open_fleet`` (backend ``vllm``), run by an
    event loop in a portal thread: call its coroutines with ``portal.call``. ``publisher``,
    once a test sets it, is the fleet's restart hook."""

    portal: BlockingPortal
    fleet: Fleet
    client: VLLMClient
    http: Http
    cfg: VLLMInference
    model_dir: Path
    root: Path
    publisher: Publisher | None = None

    @property
    def url(self) -> str:
        return self.fleet.urls[0]

    async def on_restart(self, server: ServerHandle) -> None:
        if self.publisher is not None:
            await self.publisher.on_restart(server)


def tiny_tokenizer() -> Any:
    """The 43-token char tokenizer (``<pad>``, ``<bos>``, ``<eos>``, ``<sep>``, ``0-9+=a-z ``)."""
    from nexrl_async.config.model import CharTokenizer
    from nexrl_async.train.build import build_char_tokenizer

    return build_char_tokenizer(CharTokenizer(alphabet="0123456789+=abcdefghijklmnopqrstuvwxyz "))


def save_tiny_model(path: Path) -> Path:
    """A float32 Qwen2 (hidden 128, 2 layers, 2 heads of 64) with :func:`tiny_tokenizer`.

    Untied embeddings: on vLLM's CPU backend a disk reload does not refresh a tied LM head.
    """
    from nexrl_async.config.model import BuiltModel
    from nexrl_async.train.build import build_model_for, save_model_dir

    tok = tiny_tokenizer()
    cfg = BuiltModel(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = build_model_for(cfg, tok, seed=0)
    return save_model_dir(model, tok, path)


def fleet_config(python: str) -> VLLMInference:
    """The launch of docs/vllm.md §2 through the fleet: float32, eager, with a longer context
    (:data:`CONTEXT`) than the probe's 64 tokens."""
    return VLLMInference(
        python=python,
        dtype="float32",
        max_model_len=CONTEXT,
        extra_args=["--seed", "0"],
        health_timeout_s=STARTUP_DEADLINE_S,
        health_interval_s=1.0,
        restart_backoff_s=0.2,
        max_restarts=1,
        stop_grace_s=30.0,
        request_timeout_s=120.0,
    )


@asynccontextmanager
async def _open_live(
    portal: BlockingPortal, cfg: VLLMInference, model_dir: Path, root: Path
) -> AsyncIterator[LiveFleet]:
    holder: list[LiveFleet] = []

    async def on_restart(server: ServerHandle) -> None:
        await holder[0].on_restart(server)

    async with (
        open_http_pool() as http,
        open_fleet(
            cfg, model_dir=model_dir, log_dir=root / "logs", http=http, on_restart=on_restart
        ) as fleet,
    ):
        client = VLLMClient.from_config(fleet.urls[0], cfg, http=http)
        live = LiveFleet(portal, fleet, client, http, cfg, model_dir, root)
        holder.append(live)
        yield live


@pytest.fixture(scope="session")
def vllm_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    """One fleet-launched vLLM server for the whole folder (the last test kills it once and
    the fleet restarts it); every server process is stopped by the fleet at the end."""
    assert VLLM_PYTHON is not None
    root = tmp_path_factory.mktemp("vllm")
    model_dir = save_tiny_model(root / "model")
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(
            _open_live(portal, fleet_config(VLLM_PYTHON), model_dir, root)
        ) as live,
    ):
        yield live


@pytest.fixture(scope="session")
def vllm_server(vllm_fleet: LiveFleet) -> VLLMServer:
    return VLLMServer(vllm_fleet.url, vllm_fleet.model_dir)
