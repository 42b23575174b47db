"""Generation through HTTP: OpenAI client, native /generate, streams, log-probs, batching."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

PROMPT = [1, 5, 6, 14, 7, 17]  # <bos> 1 2 + 3 =


async def generate(client: httpx.AsyncClient, **body: Any) -> Any:
    response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def stream_events(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[Any]:
    """Every ``data:`` payload of an SSE response (``[DONE]`` kept as the string)."""
    events: list[Any] = []
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_openai_client_chat_completion(server: Any, oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "1+2="}],
        max_tokens=6,
        temperature=0,
    )
    choice = chat.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.message.role == "assistant"
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == 6  # <bos> 1 + 2 = <sep>
    assert 1 <= chat.usage.completion_tokens <= 6
    assert choice.finish_reason in ("stop", "length")

    pieces = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "1+2="}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(pieces)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    models = oai.models.list()
    assert [m.id for m in models.data] == [str(server_model_path(server))]


def server_model_path(server: Any) -> str:
    return str(httpx.get(f"{server.url}/model_info", headers=server.headers).json()["model_path"])


def test_openai_completions(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="tiny", prompt="12+", max_tokens=4, temperature=0, n=2)
    assert [c.index for c in done.choices] == [0, 1]
    assert done.choices[0].text == done.choices[1].text  # greedy
    assert done.usage is not None
    assert done.usage.prompt_tokens == 4


async def test_stream_and_non_stream_agree(client: httpx.AsyncClient) -> None:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    }
    whole = await generate(client, **body)
    events = await stream_events(client, "/generate", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    last = chunks[-1]
    assert last["output_ids"] == whole["output_ids"]
    assert last["text"] == whole["text"]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    for before, after in itertools.pairwise(chunks):  # cumulative chunks
        assert after["output_ids"][: len(before["output_ids"])] == before["output_ids"]
    stream_lps = [e[0] for e in last["meta_info"]["output_token_logprobs"]]
    whole_lps = [e[0] for e in whole["meta_info"]["output_token_logprobs"]]
    assert stream_lps == pytest.approx(whole_lps, abs=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
async def test_logprobs_match_a_forward_pass(
    client: httpx.AsyncClient, model_dirs: tuple[Path, Path], temperature: float
) -> None:
    out = await generate(
        client,
        input_ids=PROMPT,
        sampling_params={
            "max_new_tokens": 10,
            "temperature": temperature,
            "sampling_seed": 7,
            "ignore_eos": True,
        },
        return_logprob=True,
        logprob_start_len=0,
    )
    meta = out["meta_info"]
    ids = out["output_ids"]
    assert [e[1] for e in meta["output_token_logprobs"]] == ids
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dirs[0]).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + ids])).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    logprobs = torch.log_softmax(logits / scale, dim=-1)
    n = len(PROMPT)
    expected = [float(logprobs[n - 1 + i, tok]) for i, tok in enumerate(ids)]
    assert [e[0] for e in meta["output_token_logprobs"]] == pytest.approx(expected, abs=1e-4)
    expected_in = [float(logprobs[i - 1, PROMPT[i]]) for i in range(1, n)]
    inputs = meta["input_token_logprobs"]
    assert inputs[0] == [None, PROMPT[0], None]
    assert [e[0] for e in inputs[1:]] == pytest.approx(expected_in, abs=1e-4)
    if temperature == 0:
        assert ids == logits[n - 1 :].argmax(-1)[: len(ids)].tolist()


async def test_seeded_sampling_is_reproducible(client: httpx.AsyncClient) -> None:
    params = {"max_new_tokens": 16, "temperature": 1.0, "ignore_eos": True}
    first = await generate(client, input_ids=PROMPT, sampling_params={**params, "sampling_seed": 3})
    again = await generate(client, input_ids=PROMPT, sampling_params={**params, "sampling_seed": 3})
    other = await generate(client, input_ids=PROMPT, sampling_params={**params, "sampling_seed": 4})
    assert first["output_ids"] == again["output_ids"]
    assert first["output_ids"] != other["output_ids"]


async def test_stop_token_and_stop_string(client: httpx.AsyncClient) -> None:
    base = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    free = await generate(client, input_ids=PROMPT, sampling_params=base)
    ids = free["output_ids"]
    stop_id = ids[3]
    cut = ids.index(stop_id)
    stopped = await generate(
        client, input_ids=PROMPT, sampling_params={**base, "stop_token_ids": [stop_id]}
    )
    assert stopped["output_ids"] == ids[: cut + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    text = free["text"]
    stop_str = text[4]
    kept = await generate(
        client,
        input_ids=PROMPT,
        sampling_params={**base, "stop": stop_str, "no_stop_trim": True},
    )
    trimmed = await generate(client, input_ids=PROMPT, sampling_params={**base, "stop": stop_str})
    at = text.index(stop_str)
    assert trimmed["text"] == text[:at]
    assert kept["text"] == text[: at + 1]
    assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_str}
    assert trimmed["output_ids"] == ids[: at + 1]


async def test_batch_request_is_decoded_as_one_batch(client: httpx.AsyncClient) -> None:
    before = await histogram(client)
    prompts = [PROMPT[: 2 + i % 4] for i in range(8)]
    params = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    out = await generate(client, input_ids=prompts, sampling_params=params, rid="batch")
    assert [o["meta_info"]["id"] for o in out] == [f"batch_{i}" for i in range(8)]
    assert all(len(o["output_ids"]) == 5 for o in out)
    after = await histogram(client)
    assert after.get(8, 0) - before.get(8, 0) >= 5  # all 8 rows decoded together every step


async def test_batch_keeps_each_prompts_own_sampling_params(client: httpx.AsyncClient) -> None:
    # specs are validated once per distinct (parameters, prompt length): each still applies
    prompts = [PROMPT[:3], PROMPT[:3], PROMPT[:5], PROMPT[:3]]
    params = [
        {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
        {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
        {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
        {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
    ]
    out = await generate(client, input_ids=prompts, sampling_params=params)
    assert [len(o["output_ids"]) for o in out] == [2, 4, 2, 2]
    shared = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True, "stop_token_ids": [9]}
    out = await generate(client, input_ids=prompts, sampling_params=shared, return_logprob=True)
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [3, 3, 5, 3]
    for o in out:
        lengths = len(o["output_ids"]), len(o["meta_info"]["output_token_logprobs"])
        assert lengths[0] == lengths[1] <= 3
        assert 9 not in o["output_ids"][:-1]


async def test_concurrent_requests_share_decode_steps(client: httpx.AsyncClient) -> None:
    before = await histogram(client)
    params = {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}
    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(
                lambda i=i: generate(client, input_ids=PROMPT[: 2 + i % 4], sampling_params=params)
            )
    after = await histogram(client)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    steps = sum(delta.values())
    tokens = sum(k * v for k, v in delta.items())
    assert tokens == 8 * 48
    assert steps <= tokens / 2  # on average at least two requests per forward pass
    assert max(k for k, v in delta.items() if v) >= 4


async def histogram(client: httpx.AsyncClient) -> dict[int, int]:
    info = (await client.get("/server_info")).json()
    return {int(k): v for k, v in info["internal_states"][0]["batch_size_histogram"].items()}
