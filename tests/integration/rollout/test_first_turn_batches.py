"""First turns of groups that start together ride in one request (``engine.first_turns``),
against the simulated SGLang in-process: token-exact answers per group, a cancelled group aborts
only its own samples, a rejected batch fails only the group the server refuses, an interrupt
mid-batch resumes each sample alone, and a stopped batcher fails its waiting callers.

Run: ``.venv/bin/pytest tests/integration/rollout/test_first_turn_batches.py -q``
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from sim_fleet import simulated_fleet
from transformers import PreTrainedTokenizerFast

from nexrl_async.config.model import CharTokenizer
from nexrl_async.config.rollout import RolloutConfig, SamplingConfig
from nexrl_async.core.errors import EngineUnavailable, RequestRejected
from nexrl_async.core.records import DataItem, Group, Status, VersionToken
from nexrl_async.engine.fleet_generator import FleetGenerator
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.supervisor import Fleet
from nexrl_async.rollout import GeneratedTurn, RolloutWorker
from nexrl_async.testing.simulated import SimulatedServer
from nexrl_async.train.build import build_char_tokenizer

URL = SimulatedServer.ASGI_URL
SAMPLING = SamplingConfig(temperature=1.0, ignore_eos=True)


def item(index: int) -> DataItem:
    return DataItem(key=f"0:{index}", index=index, epoch=0, fields={"prompt": f"<bos>{index}<sep>"})


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_char_tokenizer(CharTokenizer())


class Length:
    inline = True

    def evaluate(self, item: DataItem, trajectory: Any) -> float:
        return float(len(trajectory.turns[-1].token_ids))


@dataclass
class Rig:
    sim: SimulatedServer
    client: SGLangClient
    fleet: Fleet
    generator: FleetGenerator
    tok: PreTrainedTokenizerFast

    def worker(self, max_new_tokens: int, group_size: int = 4) -> RolloutWorker:
        cfg = RolloutConfig(
            evaluator="x.py:Length", group_size=group_size, max_new_tokens=max_new_tokens,
            apply_chat_template=False, sampling=SAMPLING,
        )  # fmt: skip
        return RolloutWorker(cfg, tokenizer=self.tok, generator=self.generator, evaluator=Length())

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return list(self.sim.engine.stats.bodies)


@pytest.fixture
async def rig(tok: PreTrainedTokenizerFast) -> AsyncIterator[Rig]:
    async with simulated_fleet(tok, context_length=128) as (sim, client, fleet):
        generator = FleetGenerator(
            fleet, {URL: client}, current_version=lambda: 0, retries=0, batch_window_s=0.005
        )
        yield Rig(sim, client, fleet, generator, tok)


@asynccontextmanager
async def batching(generator: FleetGenerator) -> AsyncIterator[None]:
    """The batcher serving, as the engine's task group runs it (a fixture's teardown runs in
    another task, so each test opens this itself)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(generator.serve)
        await anyio.lowlevel.checkpoint()
        yield
        tg.cancel_scope.cancel()


async def run_groups(worker: RolloutWorker, indices: list[int]) -> dict[int, Group]:
    groups: dict[int, Group] = {}

    async def one(index: int) -> None:
        token = VersionToken(lease_id=index, version=0)
        groups[index] = await worker.run_group(item(index), token, group_id=f"g{index}")

    async with anyio.create_task_group() as tg:
        for index in indices:
            tg.start_soon(one, index)
    return groups


async def test_groups_that_start_together_are_one_request_with_token_exact_answers(
    rig: Rig,
) -> None:
    async with batching(rig.generator):
        groups = await run_groups(rig.worker(6), [1, 2, 3])
    (body,) = rig.bodies
    assert len(body["input_ids"]) == 12
    assert len(set(body["rid"])) == 12
    assert rig.generator.batcher.requests == 1
    assert rig.generator.first_turn_requests == 1
    for index, group in groups.items():
        prompt = rig.tok(f"<bos>{index}<sep>", add_special_tokens=False)["input_ids"]
        rows = body["input_ids"][4 * (index - 1) : 4 * index]
        assert rows == [prompt] * 4, "each group's samples ride together, in order"
        for traj in group.trajectories:
            assert traj.status is Status.OK, traj.failure_detail
            answer = traj.turns[1]
            assert len(answer.token_ids) == 6 == len(answer.logprobs or [])
            assert traj.turns[0].token_ids == prompt
        assert len({tuple(t.turns[1].token_ids) for t in group.trajectories}) == 4
        server = rig.fleet.servers[0]
        assert all(rig.fleet.router.sticky_server(f"g{index}:{i}") is server for i in range(4))


async def test_a_cancelled_group_aborts_only_its_own_samples(rig: Rig) -> None:
    answers: dict[str, list[GeneratedTurn | Exception]] = {}

    async def group(name: str) -> None:
        answers[name] = await rig.generator.generate_group(
            [1, 2, 3], max_new_tokens=60, sampling=SAMPLING,
            sticky_keys=[f"{name}:{i}" for i in range(3)],
        )  # fmt: skip

    async with batching(rig.generator), anyio.create_task_group() as tg:
        tg.start_soon(group, "kept")
        doomed = anyio.CancelScope()
        tg.start_soon(_run_in, doomed, group, "cancelled")
        await _until_running(rig.sim, 6)
        doomed.cancel()
    (body,) = rig.bodies
    aborted = {b["rid"] for b in rig.sim.engine.stats.abort_calls}
    assert aborted == set(body["rid"][3:]), "exactly the cancelled group's rids are aborted"
    assert "cancelled" not in answers
    for turn in answers["kept"]:
        assert isinstance(turn, GeneratedTurn)
        assert (turn.finish_reason, len(turn.output_ids)) == ("length", 60)


async def test_a_rejected_batch_fails_only_the_group_the_server_refuses(rig: Rig) -> None:
    async def group(name: str, prompt: list[int], out: dict[str, Any]) -> None:
        try:
            out[name] = await rig.generator.generate_group(
                prompt, max_new_tokens=4, sampling=SAMPLING,
                sticky_keys=[f"{name}:{i}" for i in range(2)],
            )  # fmt: skip
        except RequestRejected as err:
            out[name] = err

    out: dict[str, Any] = {}
    async with batching(rig.generator), anyio.create_task_group() as tg:
        tg.start_soon(group, "ok", [1, 2, 3], out)
        tg.start_soon(group, "too_long", [1] * 130, out)  # past the 128-token context
    assert isinstance(out["too_long"], RequestRejected)
    assert all(isinstance(t, GeneratedTurn) and len(t.output_ids) == 4 for t in out["ok"])
    sizes = [len(b["input_ids"]) for b in rig.bodies]
    assert sizes[0] == 4, "rejected together"
    assert sorted(sizes[1:]) == [2, 2], "then sent alone"


async def test_an_interrupt_mid_batch_resumes_each_sample_alone(rig: Rig) -> None:
    groups: dict[int, Group] = {}

    async def run() -> None:
        groups.update(await run_groups(rig.worker(40, group_size=3), [1, 2]))

    async with batching(rig.generator), anyio.create_task_group() as tg:
        tg.start_soon(run)
        await _until_running(rig.sim, 6, tokens=3)
        rig.fleet.pause_routing()  # what a publication in interrupt mode does
        await rig.client.pause_generation("abort")
        await rig.fleet.wait_drained()
        await rig.client.update_weights_from_disk("/w/1", weight_version=1)
        await rig.client.continue_generation()
        rig.fleet.resume_routing()
    first, *resumes = rig.bodies
    assert len(first["input_ids"]) == 6
    assert len(resumes) == 6, "each sample resumes alone"
    for group in groups.values():
        for traj in group.trajectories:
            assert traj.status is Status.OK, traj.failure_detail
            answer = traj.turns[1]
            assert len(answer.token_ids) == 40
            old, new = answer.versions
            assert (old.version, new.version) == (0, 1)
            own_prefix = traj.turns[0].token_ids + answer.token_ids[: old.end]
            assert own_prefix in [body["input_ids"] for body in resumes]


async def test_a_stopped_batcher_fails_its_waiting_callers_and_then_steps_aside(rig: Rig) -> None:
    generator = FleetGenerator(
        rig.fleet, {URL: rig.client}, current_version=lambda: 0, retries=0, batch_window_s=10.0
    )
    errors: list[Exception] = []

    async def group() -> None:
        try:
            await generator.generate_group(
                [1, 2], max_new_tokens=2, sampling=SAMPLING, sticky_keys=["s:0", "s:1"]
            )
        except EngineUnavailable as err:
            errors.append(err)

    async with anyio.create_task_group() as tg:
        serving = anyio.CancelScope()
        tg.start_soon(_run_in, serving, generator.serve)
        await anyio.sleep(0.01)
        tg.start_soon(group)
        await anyio.sleep(0.01)
        serving.cancel()
    assert [str(e) for e in errors] == ["the first-turn batcher stopped"]
    assert not generator.batcher.serving
    assert not rig.bodies
    answers = await generator.generate_group(
        [1, 2], max_new_tokens=2, sampling=SAMPLING, sticky_keys=["t:0", "t:1"]
    )
    assert all(isinstance(t, GeneratedTurn) for t in answers), "sent alone, not batched"
    assert generator.batcher.requests == 0
    assert generator.first_turn_requests == 1


async def _run_in(scope: anyio.CancelScope, fn: Any, *args: Any) -> None:
    with scope:
        await fn(*args)


async def _until_running(sim: SimulatedServer, count: int, tokens: int = 1) -> None:
    with anyio.fail_after(5):
        while True:
            running = list(sim.engine.requests.values())
            if len(running) >= count and all(len(r.output_ids) >= tokens for r in running):
                return
            await anyio.sleep(0.001)
