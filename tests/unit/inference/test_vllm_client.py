"""``VLLMClient`` against a fake vLLM replaying docs/vllm.md's shapes (``tests/support``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from fake_vllm import URL, FakeVLLM

from nexrl_async.core.errors import GenerationError, RequestRejected
from nexrl_async.core.records import VersionSpan
from nexrl_async.inference.client.backend import GenerationBackend
from nexrl_async.inference.client.retry import RetryPolicy
from nexrl_async.inference.client.structs import GenerateResult, SamplingParams
from nexrl_async.inference.client.vllm import VLLMClient
from nexrl_async.inference.client.vllm_wire import UnsupportedSampling, vllm_sampling

FAST = RetryPolicy(base_delay_s=0.001, max_delay_s=0.005)
PROMPT = [1, 5, 6, 3]


@pytest.fixture
def fake() -> FakeVLLM:
    return FakeVLLM()


@pytest.fixture
async def client(fake: FakeVLLM) -> AsyncIterator[VLLMClient]:
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        yield VLLMClient(URL, http=http, backoff=FAST, seed=0, abort_grace_s=1.0)


def test_the_client_is_a_generation_backend(client: VLLMClient) -> None:
    backend: GenerationBackend = client  # checked by mypy; here it must simply construct
    assert backend.base_url == URL


async def test_generate_sends_token_ids_and_mapped_sampling(
    fake: FakeVLLM, client: VLLMClient
) -> None:
    sampling = SamplingParams(
        max_new_tokens=3, temperature=0.7, top_p=0.9, top_k=-1, min_p=0.0, sampling_seed=5,
        stop_token_ids=[2], ignore_eos=False, no_stop_trim=True, skip_special_tokens=False,
    )  # fmt: skip
    result = await client.generate(PROMPT, sampling, rid="r1")
    (body,) = fake.bodies("/inference/v1/generate")
    assert body == {
        "token_ids": PROMPT,
        "request_id": "r1",
        "sampling_params": {
            "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.0,
            "seed": 5, "stop_token_ids": [2], "ignore_eos": False,
            "include_stop_str_in_output": True, "skip_special_tokens": False, "logprobs": 0,
        },
    }  # fmt: skip
    assert result.rid == "generate-tokens-r1"
    assert result.output_ids == [10, 11, 12]
    assert result.output_logprobs == [-0.5, -1.5, -2.5]
    assert result.finish_reason.type == "length"
    assert result.finish_reason.length == 3
    assert (result.prompt_tokens, result.completion_tokens) == (4, 3)
    assert result.weight_version == "default"
    assert result.version_spans(fallback=7) == [VersionSpan(start=0, end=3, version=7)]


async def test_without_logprobs_none_are_asked_for(fake: FakeVLLM, client: VLLMClient) -> None:
    result = await client.generate(PROMPT, SamplingParams(max_new_tokens=2), return_logprob=False)
    assert "logprobs" not in fake.bodies("/inference/v1/generate")[0]["sampling_params"]
    assert result.output_logprobs is None


def answer(*choices: dict[str, Any]) -> dict[str, Any]:
    return {"request_id": "generate-tokens-a", "choices": list(choices), "usage": {}}


def choice(index: int, ids: list[int], finish: str, **extra: Any) -> dict[str, Any]:
    content = [{"token_id": i, "logprob": -1.0} for i in ids]
    return {
        "index": index, "finish_reason": finish, "token_ids": ids,
        "logprobs": {"content": content}, **extra,
    }  # fmt: skip


async def test_per_request_weight_version_spans_become_version_spans(
    fake: FakeVLLM, client: VLLMClient
) -> None:
    spans = [{"version": "3", "start": 0, "end": 2}, {"version": "4", "start": 2, "end": 5}]
    fake.answer = answer(choice(0, [7, 8, 9, 10, 11], "length", weight_versions=spans))
    result = await client.generate(PROMPT, SamplingParams(max_new_tokens=5))
    assert result.weight_version == "4"
    assert result.version_spans(fallback=0) == [
        VersionSpan(start=0, end=2, version=3),
        VersionSpan(start=2, end=5, version=4),
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (choice(0, [7, 2], "stop", stop_reason=None), ("stop", 2)),  # EOS
        (choice(0, [7, 12], "stop", stop_reason=12), ("stop", 12)),  # a stop token
        (choice(0, [7, 8], "stop", stop_reason="ab"), ("stop", "ab")),  # a stop string
        (choice(0, [7], "abort"), ("abort", None)),
    ],
)
async def test_finish_reasons(
    fake: FakeVLLM, client: VLLMClient, raw: dict[str, Any], expected: tuple[str, Any]
) -> None:
    fake.answer = answer(raw)
    result = await client.generate(PROMPT, SamplingParams(max_new_tokens=4))
    assert (result.finish_reason.type, result.finish_reason.matched) == expected


async def test_logprobs_that_do_not_match_the_tokens_are_an_error(
    fake: FakeVLLM, client: VLLMClient
) -> None:
    bad = choice(0, [7, 8], "length")
    bad["logprobs"]["content"] = bad["logprobs"]["content"][:1]
    fake.answer = answer(bad)
    with pytest.raises(GenerationError, match="do not match"):
        await client.generate(PROMPT, SamplingParams(max_new_tokens=2))
    fake.answer = answer(choice(1, [7, 8], "length"), bad)
    results = await client.generate_samples(PROMPT, 2, SamplingParams(max_new_tokens=2))
    assert isinstance(results[0], GenerationError)  # index 0 (listed second) is the bad one
    assert isinstance(results[1], GenerateResult)
    assert results[1].rid == "generate-tokens-a-1"


async def test_a_group_is_one_request_with_n(fake: FakeVLLM, client: VLLMClient) -> None:
    results = await client.generate_samples(
        PROMPT, 4, SamplingParams(max_new_tokens=3, sampling_seed=100)
    )
    (body,) = fake.bodies("/inference/v1/generate")
    assert body["sampling_params"]["n"] == 4
    assert body["sampling_params"]["seed"] == 100  # child j uses seed 100 + j (vLLM)
    outputs = [r.output_ids for r in results if isinstance(r, GenerateResult)]
    assert outputs == [[10 + j, 11 + j, 12 + j] for j in range(4)]
    with pytest.raises(ValueError, match=r"leave sampling\.n unset"):
        await client.generate_samples(PROMPT, 2, SamplingParams(n=2))
    with pytest.raises(ValueError, match="n == 1"):
        await client.generate(PROMPT, SamplingParams(n=2))


@pytest.mark.parametrize(
    ("sampling", "match"),
    [
        (SamplingParams(stop_regex="a+"), "'stop_regex'"),
        (SamplingParams(custom_params={"x": 1}), "'custom_params'"),
        (SamplingParams(max_new_tokens=0), "'max_new_tokens' = 0"),
    ],
)
async def test_a_parameter_vllm_lacks_is_refused_before_any_request(
    fake: FakeVLLM, client: VLLMClient, sampling: SamplingParams, match: str
) -> None:
    with pytest.raises(UnsupportedSampling, match=match):
        await client.generate(PROMPT, sampling)
    assert fake.calls == []


def test_constrained_decoding_maps_to_structured_outputs() -> None:
    params = vllm_sampling(
        SamplingParams(regex="[0-9]+", min_new_tokens=1, logit_bias={"5": 1.0}),
        return_logprob=False,
    )
    assert params == {
        "structured_outputs": {"regex": "[0-9]+"},
        "min_tokens": 1,
        "logit_bias": {"5": 1.0},
    }


async def test_server_rejections_carry_vllms_message(client: VLLMClient) -> None:
    with pytest.raises(RequestRejected, match="maximum model length") as caught:
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(
                lambda r: httpx.Response(
                    400, json={"error": {"message": "longer than the maximum model length"}}
                )
            )
        ) as http:
            await VLLMClient(URL, http=http).generate(PROMPT, SamplingParams(max_new_tokens=1))
    assert caught.value.status_code == 400


async def test_cancelling_a_generation_aborts_it_by_the_server_side_id(
    fake: FakeVLLM, client: VLLMClient
) -> None:
    fake.hold = True
    with anyio.move_on_after(0.2):
        await client.generate(PROMPT, SamplingParams(max_new_tokens=8), rid="c1")
    assert fake.bodies("/abort_requests") == [{"request_ids": ["generate-tokens-c1"]}]


async def test_a_deadline_aborts_the_request_too(fake: FakeVLLM) -> None:
    fake.hold = True
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        client = VLLMClient(URL, http=http, request_timeout_s=0.2, retries=0)
        with pytest.raises(Exception, match="no answer within"):
            await client.generate_samples(PROMPT, 3, SamplingParams(max_new_tokens=8))
    (abort,) = fake.bodies("/abort_requests")
    assert abort["request_ids"][0].startswith("generate-tokens-")


async def test_pause_abort_returns_partial_output_and_continue_resumes(
    fake: FakeVLLM, client: VLLMClient
) -> None:
    fake.hold = True
    results: list[GenerateResult] = []
    async with anyio.create_task_group() as tg:

        async def one() -> None:
            results.append(await client.generate(PROMPT, SamplingParams(max_new_tokens=8)))

        tg.start_soon(one)
        await anyio.sleep(0.05)
        await client.pause_generation("abort")
    assert results[0].aborted
    assert results[0].output_ids == [10, 11]
    assert len(results[0].output_logprobs or []) == 2
    await client.continue_generation()
    assert [(p, q) for _, p, q, _ in fake.calls if p in ("/pause", "/resume")] == [
        ("/pause", {"mode": "abort"}),
        ("/resume", {}),
    ]


async def test_pause_modes_map_to_vllms(fake: FakeVLLM, client: VLLMClient) -> None:
    await client.pause_generation("in_place")
    assert fake.calls[-1][2] == {"mode": "keep"}
    with pytest.raises(ValueError, match="'retract'"):
        await client.pause_generation("retract")


async def test_abort_all(fake: FakeVLLM, client: VLLMClient) -> None:
    await client.abort_request(abort_all=True)
    assert fake.bodies("/abort_requests") == [{}]
    with pytest.raises(ValueError, match="needs a rid"):
        await client.abort_request()


async def test_a_disk_load_pauses_waiting_reloads_resets_relabels_and_resumes(
    fake: FakeVLLM, client: VLLMClient
) -> None:
    await client.update_weights_from_disk("/w/v1", weight_version=1)
    steps = [(p, q) for _, p, q, _ in fake.calls]
    assert steps == [
        ("/pause", {"mode": "wait"}),
        ("/collective_rpc", {}),
        ("/reset_prefix_cache", {}),
        ("/update_weight_version", {}),
        ("/resume", {}),
    ]
    rpc = fake.bodies("/collective_rpc")[0]
    assert rpc == {"method": "reload_weights", "kwargs": {"weights_path": "/w/v1"}}
    info = await client.model_info()
    assert (info.model_path, info.weight_version, info.weight_version_int) == ("/w/v1", "1", 1)
    assert not fake.paused


async def test_a_load_while_paused_by_the_publisher_leaves_the_pause_to_it(
    fake: FakeVLLM, client: VLLMClient
) -> None:
    await client.pause_generation("abort")
    await client.update_weights_from_disk("/w/v2", weight_version=2, flush_cache=False)
    assert fake.paths() == ["/pause", "/collective_rpc", "/update_weight_version"]
    assert fake.paused
    await client.continue_generation()
    assert not fake.paused


async def test_a_failed_load_still_resumes(fake: FakeVLLM, client: VLLMClient) -> None:
    fake.reset_ok = False  # requests hold blocks: the cache cannot be reset
    with pytest.raises(RequestRejected, match="reset_prefix_cache"):
        await client.update_weights_from_disk("/w/v1", weight_version=1)
    assert fake.paths()[-1] == "/resume"
    assert not fake.paused
    assert fake.weight_version == "default"


async def test_health(fake: FakeVLLM, client: VLLMClient) -> None:
    assert await client.health()
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(503))
    ) as http:
        assert not await VLLMClient(URL, http=http, retries=0).health()
