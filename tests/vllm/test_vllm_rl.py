"""The RL contract with a real vLLM server, through our own parts: ``VLLMClient``, the weight
publisher (disk transport: ``reload_weights``) and the fleet that launched the server.

Runs after ``test_vllm_protocol.py`` on the same server (the session's fleet, conftest) and in
this order: step-0 log-probs against the trainer's; a drained publication (new version served,
new outputs, the trainer's log-probs); an interrupting one (aborted partials resumed on the new
version; it also runs alone); abort and pause/resume through the client; last, the server
killed and restarted by the fleet with the current weights.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from nexrl_async.config.inference import WeightsConfig
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionToken
from nexrl_async.inference.client.structs import GenerateResult, SamplingParams
from nexrl_async.inference.client.vllm import VLLMClient
from nexrl_async.train.trainer import Trainer
from nexrl_async.weights import DiskTransport, Publisher

from .conftest import LiveFleet, tiny_tokenizer

pytestmark = pytest.mark.timeout(900)  # the last test waits for a full vLLM restart

PROMPT = [1, 5, 6, 14, 7, 17]
LONG = 480
"""Tokens of a long generation: PROMPT + LONG fills most of the 512-token context. Long enough
that a pause lands mid-sequence even when the continue -> pause round trip takes a few hundred
ms on a loaded machine (56 tokens were all generated inside one such window)."""
TOKEN = VersionToken(lease_id=0, version=0)


@pytest.fixture(scope="module")
def trainer(vllm_fleet: LiveFleet) -> Trainer:
    """A trainer on exactly the served folder's weights."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(vllm_fleet.model_dir, dtype=torch.float32)
    return Trainer(
        model,
        tiny_tokenizer(),
        algorithm=AlgorithmConfig(),
        optim=OptimConfig(lr=1e-3),
        trainer=TrainerConfig(device="cpu", threads=1),
        max_new_tokens=LONG,
    )


@pytest.fixture(scope="module")
def publisher(vllm_fleet: LiveFleet, trainer: Trainer) -> Iterator[Publisher]:
    """The disk publisher over the fleet, and the fleet's restart hook."""
    cfg = WeightsConfig(transport="disk", inflight="drain", step_timeout_s=120.0, retries=1)
    clients = {vllm_fleet.url: vllm_fleet.client}

    async def make() -> Publisher:
        transport = DiskTransport(
            cfg, clients=clients, weights_dir=vllm_fleet.root / "weights",
            export=trainer.save_hf, initial_path=vllm_fleet.model_dir,
        )  # fmt: skip
        return Publisher(cfg, fleet=vllm_fleet.fleet, clients=clients, transport=transport)  # type: ignore[arg-type]

    vllm_fleet.publisher = vllm_fleet.portal.call(make)
    return vllm_fleet.publisher


def forward_logprobs(
    model: Any, prompt: list[int], output: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """log p(output[t] | prompt + output[:t]) of ``model`` at ``temperature``."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logprobs[len(prompt) - 1 :]


def generate(live: LiveFleet, prompt: list[int], **sampling: Any) -> GenerateResult:
    async def one() -> GenerateResult:
        return await live.client.generate(prompt, SamplingParams(**sampling))

    return live.portal.call(one)


def greedy(live: LiveFleet) -> GenerateResult:
    return generate(live, PROMPT, max_new_tokens=16, temperature=0.0, ignore_eos=True)


def assert_serves(live: LiveFleet, trainer: Trainer, version: int) -> None:
    """The served weights are the trainer's (log-probs of a greedy answer) and labelled so."""
    result = greedy(live)
    expected = forward_logprobs(trainer.model, PROMPT, result.output_ids)
    assert torch.allclose(torch.tensor(result.output_logprobs), expected, atol=1e-4, rtol=0)
    assert result.weight_version == str(version)
    assert live.portal.call(live.client.model_info).weight_version_int == version


async def engine_counts(http: httpx.AsyncClient) -> tuple[float, float]:
    """vLLM's ``/metrics``: requests running in the engine, output tokens generated so far."""
    text = (await http.get("/metrics")).text
    values = {"vllm:num_requests_running": 0.0, "vllm:generation_tokens_total": 0.0}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in values:
            values[name] += float(rest.rpartition(" ")[2])
    return values["vllm:num_requests_running"], values["vllm:generation_tokens_total"]


async def pause_mid_sequence(
    client: VLLMClient, metrics: httpx.AsyncClient, tokens_before: float, *, children: int
) -> bool:
    """Pause in place once ``children`` requests run and have sampled a few tokens each; False
    (and not paused) when they all finished first.

    Progress is read while paused (``/metrics`` is slow to render on a busy CPU and the engine
    runs on meanwhile), resuming briefly until there is enough: a fixed sleep lands before the
    first token on a cold server, and polling unpaused can overshoot the whole generation. The
    unpaused window doubles (5 ms to 0.1 s) while the engine makes no progress in it: on a
    loaded machine a 5 ms window can end before the engine core schedules a step, every time.
    A pause can also take seconds to land there (seen once: all 480 tokens done meanwhile), so
    callers try again with a fresh generation (:func:`paused_attempts`).
    """
    window, last = 0.005, tokens_before
    with anyio.fail_after(60):
        while True:
            await client.pause_generation("in_place")
            running, tokens = await engine_counts(metrics)
            if running >= children and tokens - tokens_before >= 4 * children:
                return True
            window = min(2 * window, 0.1) if tokens == last else window
            last = tokens
            await client.continue_generation()
            if tokens - tokens_before >= children * LONG:
                return False
            await anyio.sleep(window)


ATTEMPTS = 3
"""Fresh generations a test starts before it gives up pausing one mid-sequence."""


def nudge(trainer: Trainer, seed: int) -> None:
    """Move every parameter visibly (a stand-in for many training steps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))


def batch_of(groups: list[tuple[list[int], list[Any]]]) -> TrainBatch:
    """A step-0 batch of single-turn samples with the server's log-probs and 0/1 rewards."""
    out = []
    for g, (prompt, results) in enumerate(groups):
        trajectories = [
            Trajectory(
                group_id=f"g{g}",
                item_key=f"g{g}",
                sample_index=i,
                token=TOKEN,
                reward=float(i % 2),
                turns=[
                    Turn(role="user", token_ids=prompt, loss_mask=[0] * len(prompt)),
                    Turn(
                        role="assistant",
                        token_ids=r.output_ids,
                        loss_mask=[1] * len(r.output_ids),
                        logprobs=r.output_logprobs,
                    ),
                ],
            )
            for i, r in enumerate(results)
        ]
        out.append(
            Group(group_id=f"g{g}", item_key=f"g{g}", token=TOKEN, trajectories=trajectories)
        )
    return TrainBatch(step=0, groups=out)


def test_step0_logprobs_from_vllm_match_the_trainers(
    vllm_fleet: LiveFleet, trainer: Trainer
) -> None:
    prompts = [[1, 5 + i, 6 + i, 3] for i in range(8)]
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)

    async def sample() -> list[tuple[list[int], list[Any]]]:
        return [(p, await vllm_fleet.client.generate_samples(p, 4, sampling)) for p in prompts]

    groups = vllm_fleet.portal.call(sample)
    assert all(isinstance(r, GenerateResult) for _, results in groups for r in results)
    metrics = trainer.step(batch_of(groups))
    mismatch = metrics["train/logprob_mismatch"]
    print(
        f"\nstep-0 train/logprob_mismatch (vLLM vs trainer, 32 samples x 12 tokens): {mismatch:.3g}"
    )
    assert mismatch < 1e-5


def test_processed_logprobs_are_at_the_sampling_temperature(vllm_fleet: LiveFleet) -> None:
    """``logprobs_mode = processed_logprobs``: log_softmax(logits / T), as the trainer's."""
    result = generate(vllm_fleet, PROMPT, max_new_tokens=12, temperature=0.7, sampling_seed=3)
    reference = AutoModelForCausalLM.from_pretrained(vllm_fleet.model_dir, dtype=torch.float32)
    expected = forward_logprobs(reference, PROMPT, result.output_ids, temperature=0.7)
    assert torch.allclose(torch.tensor(result.output_logprobs), expected, atol=1e-4, rtol=0)


def test_a_drained_publication_serves_the_new_weights(
    vllm_fleet: LiveFleet, trainer: Trainer, publisher: Publisher
) -> None:
    before = greedy(vllm_fleet)
    nudge(trainer, seed=1)
    sampling = SamplingParams(max_new_tokens=LONG, ignore_eos=True)

    async def publish_while_generating() -> tuple[GenerateResult, float]:
        running: list[GenerateResult] = []

        async def one() -> None:
            async with vllm_fleet.fleet.lease("drain"):
                running.append(await vllm_fleet.client.generate(PROMPT, sampling))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await anyio.sleep(0.05)  # leased: the hold waits for it
            stats = await publisher.publish(1)
        return running[0], stats.hold_s

    old, hold_s = vllm_fleet.portal.call(publish_while_generating)
    assert old.finish_reason.type == "length"
    assert len(old.output_ids) == LONG
    assert all(span.version != "1" for span in old.weight_versions)
    assert_serves(vllm_fleet, trainer, 1)
    after = greedy(vllm_fleet)
    assert (after.output_ids, after.output_logprobs) != (before.output_ids, before.output_logprobs)
    print(f"\ndrain: held {hold_s:.3f} s for a running request")


def test_an_interrupting_publication_aborts_and_the_prefix_resumes(
    vllm_fleet: LiveFleet, trainer: Trainer, publisher: Publisher
) -> None:
    """The partials carry the label served before (``"1"`` after the drained publication in
    file order, vLLM's ``"default"`` when run alone), the resumed prefix the new one."""
    client = vllm_fleet.client
    old = vllm_fleet.portal.call(client.model_info).weight_version
    new = publisher.version + 1
    publisher.inflight = "interrupt"
    nudge(trainer, seed=2)

    async def publish_while_generating() -> list[Any]:
        for _ in range(ATTEMPTS):
            running: list[Any] = []

            async def group(out: list[Any] = running) -> None:
                async with vllm_fleet.fleet.lease("interrupt"):
                    out.extend(await client.generate_samples(PROMPT, 8, sampling))

            async with (
                httpx.AsyncClient(base_url=vllm_fleet.url, timeout=10.0) as metrics,
                anyio.create_task_group() as tg,
            ):
                _, tokens_before = await engine_counts(metrics)
                tg.start_soon(group)
                paused = await pause_mid_sequence(client, metrics, tokens_before, children=8)
                if paused:
                    await publisher.publish(new)
            if paused:
                return running
        raise AssertionError(f"{ATTEMPTS} generations all ended before a pause landed")

    sampling = SamplingParams(max_new_tokens=LONG, ignore_eos=True)
    try:
        partials = vllm_fleet.portal.call(publish_while_generating)
    finally:
        publisher.inflight = "drain"
    assert all(isinstance(p, GenerateResult) and p.aborted for p in partials)
    first: GenerateResult = partials[0]
    done = len(first.output_ids)
    assert 0 < done < LONG
    assert len(first.output_logprobs or []) == done
    assert [span.version for span in first.weight_versions] == [old]
    rest = generate(
        vllm_fleet, PROMPT + first.output_ids, max_new_tokens=LONG - done, ignore_eos=True
    )
    assert rest.finish_reason.type == "length"
    assert len(rest.output_ids) == LONG - done
    assert [span.version for span in rest.weight_versions] == [str(new)]
    assert_serves(vllm_fleet, trainer, new)
    print(f"\ninterrupt: aborted after {[len(p.output_ids) for p in partials]} tokens")


def test_abort_mid_generation_returns_the_partial_output(vllm_fleet: LiveFleet) -> None:
    client = vllm_fleet.client

    async def abort_after_some_tokens() -> GenerateResult:
        for attempt in range(ATTEMPTS):
            running: list[GenerateResult] = []
            rid = f"abort-me-{attempt}"

            async def one(rid: str = rid, out: list[GenerateResult] = running) -> None:
                sampling = SamplingParams(max_new_tokens=LONG, ignore_eos=True)
                out.append(await client.generate(PROMPT, sampling, rid=rid))

            try:
                async with (
                    httpx.AsyncClient(base_url=vllm_fleet.url, timeout=10.0) as metrics,
                    anyio.create_task_group() as tg,
                ):
                    _, tokens_before = await engine_counts(metrics)
                    tg.start_soon(one)
                    # mid-sequence, keeps its tokens (a fixed sleep can see every token done)
                    if not await pause_mid_sequence(client, metrics, tokens_before, children=1):
                        continue
                    with anyio.fail_after(60):
                        while not running:  # an id the engine does not hold yet is a no-op
                            await client.abort_request(rid)
                            await anyio.sleep(0.3)
            finally:
                await client.continue_generation()
            return running[0]
        raise AssertionError(f"{ATTEMPTS} generations all ended before a pause landed")

    result = vllm_fleet.portal.call(abort_after_some_tokens)
    assert result.aborted
    assert 0 < len(result.output_ids) < LONG
    assert len(result.output_logprobs or []) == len(result.output_ids)


def test_pause_holds_new_requests_until_continue(vllm_fleet: LiveFleet) -> None:
    client = vllm_fleet.client

    async def paused_then_resumed() -> tuple[bool, GenerateResult]:
        running: list[GenerateResult] = []

        async def one() -> None:
            running.append(await client.generate(PROMPT, SamplingParams(max_new_tokens=8)))

        await client.pause_generation("abort")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(one)
                await anyio.sleep(1.0)
                held = not running
                await client.continue_generation()
        finally:
            await client.continue_generation()
        return held, running[0]

    held, result = vllm_fleet.portal.call(paused_then_resumed)
    assert held
    assert not result.aborted
    assert len(result.output_ids) >= 1


def test_a_killed_server_is_restarted_by_the_fleet_with_the_current_weights(
    vllm_fleet: LiveFleet, trainer: Trainer, publisher: Publisher
) -> None:
    server = vllm_fleet.fleet.servers[0]
    assert server.pid is not None
    assert publisher.version == 2
    os.killpg(server.pid, signal.SIGKILL)  # API server, engine core and worker
    started = time.monotonic()
    deadline = started + 600
    while not (server.restarts == 1 and server.available):
        assert time.monotonic() < deadline, "the fleet did not bring the server back"
        time.sleep(0.5)
    print(f"\nrestart: routed again after {time.monotonic() - started:.0f} s")
    assert_serves(vllm_fleet, trainer, 2)  # on_restart reloaded v2 and verified it
    log = Path(vllm_fleet.root / "logs" / "server0.log").read_text(errors="replace")
    assert log.count("=== nexrl_async: launch") == 2
