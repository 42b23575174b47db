"""The project's SGLang client against the local server: the two sides agree on the contract."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import anyio
import httpx

from nexrl_async.inference.client.sglang import SamplingParams, SGLangClient

PROMPT = [1, 5, 6, 14, 7, 17]


async def running(http: httpx.AsyncClient, server: Any) -> int:
    reply = await http.get(f"{server.url}/v1/loads", headers=server.headers)
    return int(reply.json()["loads"][0]["num_running_reqs"])


async def test_client_generate_stream_control(server: Any, model_dirs: tuple[Path, Path]) -> None:
    async with httpx.AsyncClient() as http:
        sg = SGLangClient(server.url, http=http, api_key="test-key", retries=0)
        assert await sg.health()
        greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        whole = await sg.generate(PROMPT, greedy)
        assert len(whole.output_ids) == 8
        assert whole.output_logprobs is not None
        assert len(whole.output_logprobs) == 8
        assert whole.finish_reason.type == "length"
        streamed = await sg.generate(PROMPT, greedy, stream=True)
        assert streamed.output_ids == whole.output_ids
        batch = await sg.generate_batch([PROMPT, PROMPT[:3]], greedy)
        assert [len(r) for r in batch] == [1, 1]
        assert batch[0][0].output_ids == whole.output_ids
        info = await sg.model_info()
        assert info.model_path == str(model_dirs[0])
        server_info = await sg.server_info()
        assert server_info.context_length == 512

        long = SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
        results: list[Any] = []

        async def run() -> None:
            results.append(await sg.generate(PROMPT, long))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(10):
                for _ in itertools.count():
                    if await running(http, server) > 0:
                        break
                    await anyio.sleep(0.01)
            await sg.pause_generation()
            await sg.continue_generation()
        assert results[0].finish_reason.type == "abort"
        assert 0 < len(results[0].output_ids) < 400
