"""Generation through the client against the simulated server (in-process, no sockets)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nexrl_async.core.records import VersionSpan
from nexrl_async.inference.client.sglang import SamplingParams, SGLangClient
from nexrl_async.testing.simulated import SimulatedServer

Spawn = Callable[..., tuple[SimulatedServer, SGLangClient]]

PROMPT = [101, 7, 42, 9]
LONG = SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9, top_k=-1, ignore_eos=True)


async def test_generate_returns_tokens_logprobs_and_meta(client: SGLangClient) -> None:
    result = await client.generate(PROMPT, SamplingParams(max_new_tokens=64), rid="req-1")
    assert result.rid == "req-1"
    assert 1 <= len(result.output_ids) <= 64
    assert result.output_logprobs is not None
    assert len(result.output_logprobs) == len(result.output_ids)
    assert all(lp <= 0 for lp in result.output_logprobs)
    assert result.prompt_tokens == len(PROMPT)
    assert result.completion_tokens == len(result.output_ids)
    assert result.weight_version == "default"
    assert result.weight_version_int is None
    if result.finish_reason.type == "stop":
        assert result.output_ids[-1] == result.finish_reason.matched == 2


async def test_length_finish_and_no_logprobs(client: SGLangClient) -> None:
    result = await client.generate(PROMPT, LONG, return_logprob=False)
    assert result.finish_reason.type == "length"
    assert result.finish_reason.length == 40
    assert len(result.output_ids) == 40
    assert result.output_logprobs is None


async def test_only_set_sampling_params_are_sent(
    sim: SimulatedServer, client: SGLangClient
) -> None:
    await client.generate(PROMPT, SamplingParams(max_new_tokens=5, top_k=-1), rid="x")
    body = sim.engine.stats.bodies[-1]
    assert body["sampling_params"] == {"max_new_tokens": 5, "top_k": -1}
    assert body["input_ids"] == PROMPT
    assert body["rid"] == "x"
    assert body["return_logprob"] is True
    assert body["stream"] is False


async def test_extra_fields_reach_the_server(sim: SimulatedServer, client: SGLangClient) -> None:
    await client.generate(PROMPT, LONG, extra={"lora_path": "adapter-a"})
    assert sim.engine.stats.bodies[-1]["lora_path"] == "adapter-a"


@pytest.mark.parametrize("stream_output", ["cumulative", "incremental", "mixed"])
@pytest.mark.parametrize("interval", [1, 3])
async def test_streams_give_the_same_tokens_as_non_stream(
    spawn: Spawn, stream_output: str, interval: int
) -> None:
    _, client = spawn(stream_output=stream_output, stream_interval=interval)
    plain = await client.generate(PROMPT, LONG)
    streamed = await client.generate(PROMPT, LONG, stream=True)
    assert streamed.output_ids == plain.output_ids
    assert streamed.output_logprobs == plain.output_logprobs
    assert streamed.text == plain.text
    assert streamed.finish_reason == plain.finish_reason


async def test_stream_chunks_are_deltas_with_a_final_result(spawn: Spawn) -> None:
    _, client = spawn(stream_output="cumulative", stream_interval=4)
    chunks = []
    async with client.stream_generate(PROMPT, LONG) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    assert [len(c.token_ids) for c in chunks] == [4] * 10
    assert [c.completion_tokens for c in chunks] == list(range(4, 41, 4))
    assert chunks[-1].final == stream.result
    assert [t for c in chunks for t in c.token_ids] == stream.result.output_ids


async def test_stream_result_before_the_end_is_an_error(client: SGLangClient) -> None:
    stream = client.stream_generate(PROMPT, LONG)
    with pytest.raises(RuntimeError, match="enter the stream"):
        stream.__aiter__()
    async with stream:
        pass
    with pytest.raises(Exception, match="has not finished"):
        _ = stream.result


async def test_same_prompt_is_deterministic_and_seeds_differ(client: SGLangClient) -> None:
    a = await client.generate(PROMPT, LONG)
    b = await client.generate(PROMPT, LONG)
    c = await client.generate(
        PROMPT, SamplingParams(max_new_tokens=40, ignore_eos=True, sampling_seed=1)
    )
    assert a.output_ids == b.output_ids != c.output_ids


async def test_batch_and_n_samples_come_back_grouped_per_prompt(
    sim: SimulatedServer, client: SGLangClient
) -> None:
    groups = await client.generate_batch([PROMPT, [1, 2]], SamplingParams(max_new_tokens=8, n=3))
    assert [len(g) for g in groups] == [3, 3]
    assert len({tuple(r.output_ids) for r in groups[0]}) == 3
    assert len({r.rid for g in groups for r in g}) == 6
    assert groups[1][0].prompt_tokens == 2
    assert "rid" not in sim.engine.stats.bodies[-1]
    singles = await client.generate_batch([PROMPT, [1, 2]], SamplingParams(max_new_tokens=8))
    assert [len(g) for g in singles] == [1, 1]
    assert [g[0].rid for g in singles] == sim.engine.stats.bodies[-1]["rid"]


async def test_generate_refuses_n_above_one(client: SGLangClient) -> None:
    with pytest.raises(ValueError, match="n == 1"):
        await client.generate(PROMPT, SamplingParams(n=2))


async def test_stop_token_ids_end_generation_with_the_matched_id(client: SGLangClient) -> None:
    first = await client.generate(PROMPT, LONG)
    stop = first.output_ids[5]
    sampling = SamplingParams(max_new_tokens=40, ignore_eos=True, stop_token_ids=[stop])
    result = await client.generate(PROMPT, sampling)
    assert result.finish_reason.type == "stop"
    assert result.finish_reason.matched == stop
    assert result.output_ids == first.output_ids[: first.output_ids.index(stop) + 1]


async def test_zero_max_new_tokens(client: SGLangClient) -> None:
    result = await client.generate(PROMPT, SamplingParams(max_new_tokens=0))
    assert result.output_ids == []
    assert result.finish_reason.type == "length"


async def test_weight_version_after_an_update_is_reported_per_token(client: SGLangClient) -> None:
    await client.update_weights_from_disk("/ckpt/step-3", weight_version=3)
    result = await client.generate(PROMPT, LONG)
    assert result.weight_version_int == 3
    assert result.version_spans(fallback=0) == [VersionSpan(start=0, end=40, version=3)]


async def test_legacy_server_has_no_spans_but_spans_still_cover_the_tokens(spawn: Spawn) -> None:
    _, client = spawn(legacy=True, weight_version="5")
    result = await client.generate(PROMPT, LONG)
    assert result.weight_versions == []
    assert result.version_spans(fallback=0) == [VersionSpan(start=0, end=40, version=5)]


async def test_skip_tokenizer_init_responses_have_no_text(spawn: Spawn) -> None:
    _, client = spawn(return_text=False)
    assert (await client.generate(PROMPT, LONG)).text is None
    assert (await client.generate(PROMPT, LONG, stream=True)).text is None


async def test_api_key_is_sent_as_bearer(spawn: Spawn) -> None:
    _, client = spawn(api_key="k1", client={"api_key": "k1"})
    assert len((await client.generate(PROMPT, LONG)).output_ids) == 40
