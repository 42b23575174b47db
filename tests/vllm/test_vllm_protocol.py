"""vLLM's token-in/token-out and RL control routes over raw HTTP, as docs/vllm.md tells."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

pytestmark = pytest.mark.timeout(600)  # the first test also waits for the server to start

PROMPT = [1, 5, 6, 14, 7, 17]
GENERATE = "/inference/v1/generate"


def client(server: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=60.0)


async def generate(http: httpx.AsyncClient, sampling: dict[str, Any], **extra: Any) -> Any:
    reply = await http.post(
        GENERATE, json={"token_ids": PROMPT, "sampling_params": sampling, **extra}
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def reference_logprobs(model_dir: Path, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion[t] | prompt + completion[:t]) from a plain transformers forward."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[len(prompt) - 1 + t, tok]) for t, tok in enumerate(completion)]


async def test_generate_token_ids_with_logprobs(vllm_server: Any) -> None:
    async with client(vllm_server) as http:
        body = await generate(
            http,
            {"max_tokens": 6, "ignore_eos": True, "logprobs": 0, "seed": 7},
            request_id="tokens-1",
        )
        weight_version = (await http.get("/weight_info")).json()["weight_version"]
    assert body["request_id"] == "generate-tokens-tokens-1"
    assert body["usage"]["prompt_tokens"] == len(PROMPT)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    tokens = choice["token_ids"]
    assert len(tokens) == 6
    content = choice["logprobs"]["content"]
    assert [entry["token_id"] for entry in content] == tokens
    assert choice["weight_versions"] == [{"version": weight_version, "start": 0, "end": 6}]
    expected = reference_logprobs(vllm_server.model_dir, PROMPT, tokens)
    got = [entry["logprob"] for entry in content]
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4


async def test_n_samples_use_seed_plus_index(vllm_server: Any) -> None:
    sampling = {"max_tokens": 5, "ignore_eos": True, "logprobs": 0}
    async with client(vllm_server) as http:
        group = await generate(http, {**sampling, "n": 4, "seed": 100})
        singles = [await generate(http, {**sampling, "seed": 100 + j}) for j in range(4)]
    assert [c["index"] for c in group["choices"]] == [0, 1, 2, 3]
    samples = [c["token_ids"] for c in group["choices"]]
    assert samples == [s["choices"][0]["token_ids"] for s in singles]
    assert len({tuple(s) for s in samples}) > 1
    assert group["usage"]["completion_tokens"] == 20


async def test_pause_queues_new_requests_until_resume(vllm_server: Any) -> None:
    results: list[Any] = []

    async def one() -> None:
        results.append(await generate(http, {"max_tokens": 4, "ignore_eos": True}))

    async with client(vllm_server) as http:
        paused = await http.post("/pause", params={"mode": "abort"})
        assert paused.json() == {"status": "paused"}
        try:
            assert (await http.get("/is_paused")).json() == {"is_paused": True}
            async with anyio.create_task_group() as tg:
                tg.start_soon(one)
                await anyio.sleep(1.0)
                assert results == []  # held while paused, not refused
                update = await http.post("/update_weight_version", json={"new_version": "step-1"})
                assert update.json() == {"success": True, "new_version": "step-1"}
                assert (await http.post("/resume")).json() == {"status": "resumed"}
        finally:
            await http.post("/resume")
        assert (await http.get("/is_paused")).json() == {"is_paused": False}
        assert (await http.get("/weight_info")).json() == {"weight_version": "step-1"}
    (choice,) = results[0]["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["weight_versions"] == [{"version": "step-1", "start": 0, "end": 4}]


async def test_abort_by_request_id(vllm_server: Any) -> None:
    results: list[Any] = []

    async def one() -> None:
        sampling = {"max_tokens": 40, "ignore_eos": True, "n": 2, "logprobs": 0}
        results.append(await generate(http, sampling, request_id="abort-me"))

    async with client(vllm_server) as http:
        await http.post("/pause", params={"mode": "keep"})  # freeze it before any token
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(one)
                with anyio.fail_after(60):
                    while not results:  # an id the engine does not hold yet is a no-op
                        reply = await http.post(
                            "/abort_requests", json={"request_ids": ["generate-tokens-abort-me"]}
                        )
                        assert reply.json() == {"status": "aborted", "aborted": 1}
                        await anyio.sleep(0.5)
        finally:
            await http.post("/resume")
    choices = results[0]["choices"]
    assert [c["finish_reason"] for c in choices] == ["abort", "abort"]
    assert all(c["token_ids"] == [] for c in choices)
