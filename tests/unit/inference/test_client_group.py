"""A group's samples in one request (``SGLangClient.generate_samples``) against the simulated
SGLang: the batch form on the wire, distinct samples, aborts and interrupts mid-group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from nexrl_async.core.errors import GenerationError, RequestRejected
from nexrl_async.inference.client.sglang import GenerateResult, SamplingParams, SGLangClient
from nexrl_async.testing.simulated import SimulatedServer

Spawn = Callable[..., tuple[SimulatedServer, SGLangClient]]

PROMPT = [101, 7, 42, 9]
LONG = SamplingParams(max_new_tokens=30, temperature=1.0, ignore_eos=True)


def results_only(answers: list[Any]) -> list[GenerateResult]:
    assert all(isinstance(a, GenerateResult) for a in answers), answers
    return answers


async def test_one_request_carries_the_group_in_the_batch_form(
    sim: SimulatedServer, client: SGLangClient
) -> None:
    answers = results_only(await client.generate_samples(PROMPT, 4, LONG))
    assert sim.engine.stats.generate_requests == 1
    body = sim.engine.stats.bodies[-1]
    assert body["input_ids"] == [PROMPT] * 4
    assert "n" not in body["sampling_params"]
    assert len(set(body["rid"])) == 4
    assert [a.rid for a in answers] == body["rid"]
    assert len({tuple(a.output_ids) for a in answers}) == 4, "samples of a group must differ"
    for answer in answers:
        assert answer.finish_reason.type == "length"
        assert len(answer.output_ids) == 30
        assert answer.output_logprobs is not None
        assert len(answer.output_logprobs) == 30
        assert answer.prompt_tokens == len(PROMPT)


async def test_a_group_sample_is_what_the_same_position_would_generate_alone(
    spawn: Spawn,
) -> None:
    """Token-exact: sample 0 of a group request equals a single request of the same prompt."""
    _, client = spawn(seed=3)
    group = results_only(await client.generate_samples(PROMPT, 3, LONG))
    alone = await client.generate(PROMPT, LONG)
    assert group[0].output_ids == alone.output_ids
    assert group[0].output_logprobs == alone.output_logprobs


async def test_n_above_one_is_refused(client: SGLangClient) -> None:
    with pytest.raises(ValueError, match=r"sampling\.n"):
        await client.generate_samples(PROMPT, 2, SamplingParams(n=2))


async def test_abort_of_one_sample_mid_group_keeps_the_others(spawn: Spawn) -> None:
    sim, client = spawn(token_latency_s=0.003)
    answers: list[Any] = []

    async def run() -> None:
        answers.extend(await client.generate_samples(PROMPT, 3, LONG))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await _until_tokens(sim, 3)
        victim = sim.engine.stats.bodies[-1]["rid"][1]
        await client.abort_request(victim)
    first, aborted, last = results_only(answers)
    assert aborted.rid == victim
    assert aborted.aborted
    assert 0 < len(aborted.output_ids) < 30
    assert aborted.output_logprobs is not None
    assert len(aborted.output_logprobs) == len(aborted.output_ids)
    assert (first.finish_reason.type, last.finish_reason.type) == ("length", "length")


async def test_interrupt_mid_group_then_each_sample_resumes_its_own_prefix(spawn: Spawn) -> None:
    """A publication in ``interrupt`` mode: every sample comes back with its partial tokens
    under the old version; each resumes alone from its own prefix under the new one."""
    sim, client = spawn(token_latency_s=0.003, weight_version="1")
    answers: list[Any] = []

    async def run() -> None:
        answers.extend(await client.generate_samples(PROMPT, 3, LONG))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await _until_tokens(sim, 2)
        await client.pause_generation("abort")
    partials = results_only(answers)
    assert all(p.aborted for p in partials)
    await client.update_weights_from_disk("/w/2", weight_version=2)
    await client.continue_generation()
    for partial in partials:
        assert partial.weight_version == "1"
        done = len(partial.output_ids)
        assert 0 < done < 30
        rest = await client.generate(
            PROMPT + partial.output_ids,
            SamplingParams(max_new_tokens=30 - done, temperature=1.0, ignore_eos=True),
        )
        assert rest.prompt_tokens == len(PROMPT) + done
        assert len(rest.output_ids) == 30 - done
        assert rest.weight_version == "2"
    assert len({tuple(p.output_ids) for p in partials}) == 3


async def test_cancelling_a_group_request_aborts_every_sample(spawn: Spawn) -> None:
    sim, client = spawn(token_latency_s=0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.generate_samples, PROMPT, 3, LONG)
        await _until_tokens(sim, 1)
        rids = sim.engine.stats.bodies[-1]["rid"]
        tg.cancel_scope.cancel()
    assert sorted(call["rid"] for call in sim.engine.stats.abort_calls) == sorted(rids)


async def test_a_retried_group_request_gets_fresh_rids(spawn: Spawn) -> None:
    sim, client = spawn()
    sim.engine.faults.fail_generate = 1
    answers = results_only(await client.generate_samples(PROMPT, 2, LONG))
    first, second = list(sim.engine.stats.bodies)[-2:]
    assert [f"{rid}-retry1" for rid in first["rid"]] == second["rid"]
    assert [a.rid for a in answers] == second["rid"]


async def test_a_malformed_sample_is_that_sample_s_error() -> None:
    good = {
        "output_ids": [5, 6],
        "meta_info": {
            "id": "a",
            "finish_reason": {"type": "length", "length": 2},
            "weight_version": "0",
            "output_token_logprobs": [[-0.1, 5, None], [-0.2, 6, None]],
        },
    }
    bad = {**good, "output_ids": [5, 7]}
    rejected = {**good, "meta_info": {**good["meta_info"], "finish_reason": {
        "type": "abort", "message": "Input too long", "status_code": 400}}}  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[good, bad, rejected])

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = SGLangClient("http://mock", http=http)
        answers = await client.generate_samples(PROMPT, 3, LONG)
    assert isinstance(answers[0], GenerateResult)
    assert answers[0].output_ids == [5, 6]
    assert isinstance(answers[1], GenerationError)
    assert isinstance(answers[2], RequestRejected)


async def test_a_short_answer_list_is_a_generation_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[])

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = SGLangClient("http://mock", http=http)
        with pytest.raises(GenerationError, match="expected 2 results"):
            await client.generate_samples(PROMPT, 2, LONG)


async def _until_tokens(sim: SimulatedServer, count: int) -> None:
    """Wait until every running sample has generated at least ``count`` tokens."""
    with anyio.fail_after(5):
        while True:
            running = list(sim.engine.requests.values())
            if running and all(len(r.output_ids) >= count for r in running):
                return
            await anyio.sleep(0.001)
