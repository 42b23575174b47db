"""``weights.inflight = "in_place"`` against a real local server: no drain, versions per token.

A long request runs (through the fleet's lease, as rollout workers do) while a distributed
publication swaps the weights between two decode steps: the publication returns while the
request still runs, the request is neither aborted nor restarted, and its ``weight_versions``
spans name the old weights for the tokens before the swap and the new ones after it, which is
what the staleness contract reads (docs/architecture.md §3: the head version is the oldest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.weights.sender import WeightSender

from .conftest import start_servers, stop_all
from .test_distributed_publish import HEADERS, PROMPT, make_trainer, nudge, publishing

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(360)]  # server start-ups on busy cores


async def long_request(http: httpx.AsyncClient, url: str, out: dict[str, Any]) -> None:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 400, "temperature": 1.0, "ignore_eos": True},
    }
    reply = await http.post(f"{url}/generate", json=body, headers=HEADERS, timeout=120.0)
    out.update(reply.json())


async def running(http: httpx.AsyncClient, url: str) -> None:
    """Wait until the server decodes a request (``/v1/loads``)."""
    while True:
        loads = (await http.get(f"{url}/v1/loads", headers=HEADERS)).json()["loads"]
        if loads[0]["num_running_reqs"]:
            return
        await anyio.sleep(0.005)


async def test_in_place_swaps_under_a_running_request_without_waiting_for_it(
    model_dir: Path, tmp_path: Path
) -> None:
    servers = await anyio.to_thread.run_sync(start_servers, model_dir, tmp_path, 1)
    trainer = make_trainer()
    cfg = WeightsConfig(
        transport="distributed", inflight="in_place", step_timeout_s=20.0, retries=0, bucket_mb=1
    )
    out: dict[str, Any] = {}
    try:
        with anyio.fail_after(90):
            async with (
                publishing(servers, trainer, cfg, WeightSender, tmp_path) as (publisher, http),
                anyio.create_task_group() as tg,
            ):
                await publisher.publish(1)  # opens the group; nothing runs yet

                async def leased() -> None:
                    async with publisher.fleet.lease("long") as server:  # type: ignore[attr-defined]
                        await long_request(http, server.url, out)

                tg.start_soon(leased)
                await running(http, servers[0].url)  # decoding with v1
                nudge(trainer, seed=2)
                stats = await publisher.publish(2)
                assert not out, "the publication waited for the running request"
                assert stats.hold_s < 5.0
    finally:
        await anyio.to_thread.run_sync(stop_all, servers)
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] == "length"  # neither aborted nor cut short
    assert len(out["output_ids"]) == 400
    spans = meta["weight_versions"]
    assert [s["version"] for s in spans] == ["1", "2"]
    assert spans[0]["start"] == 0 < spans[0]["end"] == spans[1]["start"]
    assert spans[1]["end"] == 400
