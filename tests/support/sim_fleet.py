"""A one-server fleet attached to the simulated SGLang in-process, for the rollout integration
tests (``tests/support`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from transformers import PreTrainedTokenizerFast

from nexrl_async.config.inference import AttachInference
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.router import ServerHandle
from nexrl_async.inference.fleet.supervisor import Fleet
from nexrl_async.testing.simulated import SimulatedConfig, SimulatedServer

URL = SimulatedServer.ASGI_URL


@asynccontextmanager
async def simulated_fleet(
    tok: PreTrainedTokenizerFast, **config: Any
) -> AsyncIterator[tuple[SimulatedServer, SGLangClient, Fleet]]:
    """The simulated server (``tok``'s vocabulary, 8-token answers at 2 ms a token, weights
    ``"0"``; ``config`` overrides), its client, and a fleet with it up and routable."""
    sim = SimulatedServer(
        SimulatedConfig(
            vocab_size=len(tok), eos_token_id=tok.eos_token_id, mean_output_tokens=8,
            token_latency_s=0.002, weight_version="0", **config,
        )
    )  # fmt: skip
    async with httpx.AsyncClient(transport=sim.transport()) as http:
        server = ServerHandle(0, URL, max_concurrency=64)
        fleet = Fleet(AttachInference(urls=[URL]), [server], http=http)
        fleet.router.mark_up(server)
        yield sim, SGLangClient(URL, http=http), fleet
