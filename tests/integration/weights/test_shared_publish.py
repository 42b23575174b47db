"""The shared-memory transport end to end: trainer → staging file → local servers (subprocesses).

The publisher runs its real state machine over an attached pair of local servers; the trainer is a
real ``train.Trainer`` whose parameters are nudged between publications. After each publication
the servers' sampled log-probs must equal the trainer's own; in place, requests running during
the swap finish, and nothing is paused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.core.errors import WeightSyncError
from nexrl_async.inference.staging import StagingWriter
from nexrl_async.train.trainer import Trainer
from nexrl_async.weights import Publisher, SharedTransport, staging_of

from .conftest import Server, attached
from .test_distributed_publish import HEADERS, PROMPT, make_trainer, nudge, server_sample
from .test_distributed_publish import trainer_logprobs as expected_logprobs

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(360)]


@asynccontextmanager
async def publishing(
    servers: Sequence[Server], trainer: Trainer, cfg: WeightsConfig, log_dir: Path
) -> AsyncIterator[tuple[Publisher, httpx.AsyncClient]]:
    async with attached(servers, log_dir) as (fleet, clients, http):
        stage, close = staging_of(trainer.named_parameters_for_sync)
        transport = SharedTransport(cfg, clients=clients, stage=stage, close=close)
        publisher = Publisher(cfg, fleet=fleet, clients=clients, transport=transport)
        try:
            yield publisher, http
        finally:
            await publisher.aclose()


async def long_generation(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 400, "temperature": 1.0, "ignore_eos": True},
    }
    reply = await http.post(f"{url}/generate", json=body, headers=HEADERS)
    return dict(reply.json()["meta_info"])


async def until_running(http: httpx.AsyncClient, url: str) -> None:
    for _ in range(2000):  # polls /v1/loads: the server has no event to wait on
        loads = (await http.get(f"{url}/v1/loads", headers=HEADERS)).json()["loads"][0]
        if loads["num_running_reqs"] >= 1:
            return
        await anyio.sleep(0.005)
    raise AssertionError(f"no request started running on {url}")


async def test_publications_in_place_match_the_trainer_and_never_pause(
    pair: list[Server], tmp_path: Path
) -> None:
    trainer = make_trainer()
    cfg = WeightsConfig(transport="shared", inflight="in_place", step_timeout_s=20.0, retries=0)
    payload = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    running: list[dict[str, Any]] = []
    with anyio.fail_after(90):
        async with (
            publishing(pair, trainer, cfg, tmp_path) as (publisher, http),
            anyio.create_task_group() as tg,
        ):
            for server in pair:  # requests that straddle the swaps

                async def run(url: str = server.url) -> None:
                    running.append(await long_generation(http, url))

                tg.start_soon(run)
                await until_running(http, server.url)
            for version in (1, 2):
                nudge(trainer, seed=version)
                stats = await publisher.publish(version)
                assert (stats.version, stats.bytes, stats.pause_s) == (version, payload, 0.0)
                for server in pair:
                    ids, lps, served_by = await server_sample(http, server.url)
                    assert served_by == str(version)
                    expected = expected_logprobs(trainer, ids)
                    assert torch.allclose(lps, expected, atol=1e-4, rtol=0), server.url
    assert len(running) == 2
    for meta in running:  # finished, not aborted, on the old weights and then the new
        assert meta["finish_reason"] == {"type": "length", "length": 400}
        assert len({span["version"] for span in meta["weight_versions"]}) >= 2


async def test_a_drain_publication_waits_for_running_requests(
    pair: list[Server], tmp_path: Path
) -> None:
    trainer = make_trainer()
    cfg = WeightsConfig(transport="shared", inflight="drain", step_timeout_s=20.0, retries=0)
    with anyio.fail_after(90):
        async with publishing(pair, trainer, cfg, tmp_path) as (publisher, http):
            nudge(trainer, seed=3)
            stats = await publisher.publish(1)
            assert stats.pause_s > 0  # drain holds routing (nothing to wait for here)
            for server in pair:
                assert (await server_sample(http, server.url))[2] == "1"


async def test_a_staging_file_the_server_cannot_open_fails_the_publication(
    pair: list[Server], tmp_path: Path
) -> None:
    trainer = make_trainer()
    writer = StagingWriter(prefix="nexrl-test-gone")
    layout = writer.fill(trainer.named_parameters_for_sync())
    writer.close()  # the file is gone before any server maps it
    cfg = WeightsConfig(transport="shared", step_timeout_s=10.0, retries=0, retry_window_s=0.0)
    with anyio.fail_after(60):
        async with attached(pair[:1], tmp_path) as (fleet, clients, http):
            transport = SharedTransport(cfg, clients=clients, stage=lambda: layout)
            publisher = Publisher(cfg, fleet=fleet, clients=clients, transport=transport)
            before = (await server_sample(http, pair[0].url))[2]
            with pytest.raises(WeightSyncError, match="cannot read staging file"):
                await publisher.publish(1)
            assert publisher.version == 0
            assert (await server_sample(http, pair[0].url))[2] == before
