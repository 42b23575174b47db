"""Distributed weight updates on the local server, driven over HTTP against a real sender.

The test process plays the trainer: ``train.broadcast.WeightSender`` is rank 0 of a gloo group
the server (a subprocess) joins through ``/init_weights_update_group``; every collective HTTP
call is fired concurrently with the sender's side, as the weight publisher does. The server is
the session's shared one: whatever a test loads, it loads the starting weights back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import torch
from transformers import PreTrainedModel

from nexrl_async.train.export import parameters_for_sync
from nexrl_async.weights.sender import WeightSender, plan_buckets

from .conftest import tiny_model

pytestmark = pytest.mark.distributed

PROMPT = [1, 5, 6, 14, 7, 17]
GROUP = "weight_update_group"


@pytest.fixture
def http(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """The session's shared server: every test here leaves it with its starting weights."""
    return client


def perturbed(seed: int) -> PreTrainedModel:
    """The server's starting model (seed 0) with every parameter nudged."""
    model, _ = tiny_model(0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=gen))
    return model


def trainer_logprobs(model: PreTrainedModel, prompt: list[int], output: list[int]) -> torch.Tensor:
    """``log p(output_t | prefix)`` at temperature 1, the trainer's way (one full forward)."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logprobs[len(prompt) - 1 :]


async def sample(http: httpx.AsyncClient, seed: int = 3) -> tuple[list[int], torch.Tensor, str]:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 12, "temperature": 1.0, "sampling_seed": seed},
        "return_logprob": True,
    }
    out = (await http.post("/generate", json=body)).json()
    logprobs = torch.tensor([entry[0] for entry in out["meta_info"]["output_token_logprobs"]])
    return out["output_ids"], logprobs, out["meta_info"]["weight_version"]


async def init_group(http: httpx.AsyncClient, sender: WeightSender, name: str = GROUP) -> None:
    body = {
        "master_address": "127.0.0.1",
        "master_port": str(sender.port),  # AReaL sends a string; SGLang takes both
        "rank_offset": 1,
        "world_size": 2,
        "group_name": name,
        "backend": "gloo",
    }
    replies: list[httpx.Response] = []

    async def post() -> None:
        replies.append(await http.post("/init_weights_update_group", json=body))

    async with anyio.create_task_group() as tg:
        tg.start_soon(post)
        await anyio.to_thread.run_sync(sender.connect)
    assert replies[0].status_code == 200, replies[0].text
    assert replies[0].json() == {
        "success": True,
        "message": "Succeeded to initialize custom process group.",
    }


async def publish(
    http: httpx.AsyncClient,
    sender: WeightSender,
    model: PreTrainedModel,
    version: str,
    *,
    load_format: str | None,
    bucket_mb: int = 1,
) -> list[httpx.Response]:
    """begin → one update per bucket ‖ the broadcast → end (the tiny model in three parts, so
    that several buckets go out)."""
    named = list(parameters_for_sync(model))
    parts = (named[:10], named[10:20], named[20:])
    buckets = [b for part in parts for b in plan_buckets(part, bucket_mb=bucket_mb)]
    assert (await http.post("/begin_weight_update", json={})).json()["success"]
    replies: list[httpx.Response] = []

    async def post_all() -> None:
        for i, bucket in enumerate(buckets):
            body = {
                "names": bucket.names,
                "dtypes": bucket.dtypes,
                "shapes": bucket.shapes,
                "group_name": GROUP,
                "flush_cache": False,
                "load_format": load_format,
                **({"weight_version": version} if i == len(buckets) - 1 else {}),
            }
            replies.append(await http.post("/update_weights_from_distributed", json=body))

    async with anyio.create_task_group() as tg:
        tg.start_soon(post_all)
        await anyio.to_thread.run_sync(
            partial(sender.send_buckets, buckets, load_format)  # type: ignore[arg-type]
        )
    assert (await http.post("/end_weight_update", json={})).json()["success"]
    return replies


@pytest.fixture
async def sender(http: httpx.AsyncClient) -> Any:
    made = WeightSender(master_address="127.0.0.1", master_port=0, world_size=2, timeout_s=10)
    await init_group(http, made)
    try:
        yield made
    finally:
        await http.post("/destroy_weights_update_group", json={"group_name": GROUP})
        made.close()


async def test_update_gives_the_trainers_logprobs(
    http: httpx.AsyncClient, sender: WeightSender, model_dirs: tuple[Path, Path]
) -> None:
    before_ids, before_lps, start_version = await sample(http)
    try:
        await _two_updates(http, sender, model_dirs)
    finally:  # back to the starting weights: the same sample as before the updates
        await publish(http, sender, tiny_model(0)[0], start_version, load_format="flattened_bucket")
    ids, lps, _ = await sample(http)
    assert ids == before_ids
    assert torch.allclose(lps, before_lps, atol=1e-5)


async def _two_updates(
    http: httpx.AsyncClient, sender: WeightSender, model_dirs: tuple[Path, Path]
) -> None:
    for version, load_format, seed in (("1", "flattened_bucket", 1), ("2", None, 2)):
        model = perturbed(seed)
        replies = await publish(http, sender, model, version, load_format=load_format)
        assert len(replies) == 3
        for reply in replies:
            assert reply.status_code == 200, reply.text
            assert reply.json() == {
                "success": True,
                "message": "Succeeded to update parameter online.",
            }
        info = (await http.get("/model_info")).json()
        assert info["weight_version"] == version
        assert info["model_path"] == str(model_dirs[0])  # a broadcast has no path
        ids, server_lps, served_by = await sample(http)
        assert served_by == version
        trainer = trainer_logprobs(model, PROMPT, ids)
        assert torch.allclose(server_lps, trainer, atol=1e-4, rtol=0), (
            (server_lps - trainer).abs().max()
        )
        old = trainer_logprobs(tiny_model(0)[0], PROMPT, ids)
        assert (old - trainer).abs().max() > 1e-2  # the check above can fail


async def test_protocol_errors_are_sglang_shaped(
    http: httpx.AsyncClient, sender: WeightSender
) -> None:
    update = {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[1]]}

    async def call(route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        reply = await http.post(route, json=body)
        return reply.status_code, reply.json()

    assert await call("/update_weights_from_distributed", update) == (
        400,
        {
            "success": False,
            "message": "update_weights_from_distributed must run between "
            "begin_weight_update() and end_weight_update()",
        },
    )
    assert (await call("/end_weight_update", {}))[1][
        "message"
    ] == "no weight-update session is open"
    assert (await call("/begin_weight_update", {}))[0] == 200
    try:
        assert (await call("/begin_weight_update", {}))[1] == {
            "success": False,
            "message": "a weight-update session is already open",
        }
        status, body = await call("/update_weights_from_distributed", {**update, "group_name": "x"})
        assert (status, body["message"]) == (400, "Process group x is not initialized.")
        status, body = await call("/update_weights_from_distributed", {**update, "dtypes": []})
        assert "same length" in body["message"]
        status, body = await call(
            "/update_weights_from_distributed", {**update, "load_format": "direct"}
        )
        assert "not supported" in body["message"]
    finally:
        assert (await call("/end_weight_update", {}))[0] == 200
    status, body = await call("/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": sender.port, "rank_offset": 1,
        "world_size": 2, "group_name": GROUP, "backend": "gloo",
    })  # fmt: skip
    assert (status, body["message"]) == (
        400,
        f"Failed to initialize custom process group: Process group {GROUP} already exists.",
    )
    status, body = await call("/destroy_weights_update_group", {"group_name": "nope"})
    assert (status, body["message"]) == (400, "Process group nope does not exist.")
    malformed = await http.post("/init_weights_update_group", json={"master_address": "x"})
    assert malformed.status_code == 400


async def test_destroy_releases_an_update_waiting_for_a_broadcast(
    http: httpx.AsyncClient, sender: WeightSender
) -> None:
    """The trainer never broadcasts: leaving the group answers the pending update at once."""
    bucket = plan_buckets(parameters_for_sync(tiny_model(0)[0]), bucket_mb=64)[0]
    update = {"names": bucket.names, "dtypes": bucket.dtypes, "shapes": bucket.shapes}
    assert (await http.post("/begin_weight_update", json={})).status_code == 200
    replies: list[httpx.Response] = []

    async def pending() -> None:
        replies.append(await http.post("/update_weights_from_distributed", json=update))

    start = time.monotonic()
    with anyio.fail_after(8):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pending)
            await anyio.sleep(0.5)
            assert not replies
            destroyed = await http.post("/destroy_weights_update_group", json={"group_name": GROUP})
            assert destroyed.json()["success"] is True
    assert time.monotonic() - start < 5
    assert replies[0].status_code == 400
    assert "destroyed" in replies[0].json()["message"]
    assert (await http.post("/end_weight_update", json={})).status_code == 200
    # the server keeps serving, at its old version
    _, _, version = await sample(http)
    assert version == (await http.get("/model_info")).json()["weight_version"]
    health: Callable[[], Any] = partial(http.get, "/health")
    assert (await health()).status_code == 200
