"""Groups through the engine's generator and fleet against the simulated SGLang (in-process):
one request per group's first turn, distinct samples, token-exact trajectories, sticky keys,
and an ``interrupt`` publication mid-group after which each sample resumes its own prefix.

Run: ``.venv/bin/pytest tests/integration/rollout -q``
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from sim_fleet import simulated_fleet
from transformers import PreTrainedTokenizerFast

from nexrl_async.config.model import CharTokenizer
from nexrl_async.config.rollout import RolloutConfig, SamplingConfig
from nexrl_async.core.records import DataItem, Group, Status, VersionToken
from nexrl_async.engine.fleet_generator import FleetGenerator
from nexrl_async.inference.client.sglang import SGLangClient
from nexrl_async.inference.fleet.supervisor import Fleet
from nexrl_async.rollout import RolloutWorker
from nexrl_async.testing.simulated import SimulatedServer
from nexrl_async.train.build import build_char_tokenizer

URL = SimulatedServer.ASGI_URL
ITEM = DataItem(key="0:1", index=1, epoch=0, fields={"prompt": "<bos>12345<sep>"})


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_char_tokenizer(CharTokenizer())


@dataclass
class Rig:
    sim: SimulatedServer
    client: SGLangClient
    fleet: Fleet
    worker: RolloutWorker


class Length:
    inline = True

    def evaluate(self, item: DataItem, trajectory: Any) -> float:
        return float(len(trajectory.turns[-1].token_ids))


@pytest.fixture
async def rig(tok: PreTrainedTokenizerFast) -> AsyncIterator[Rig]:
    async with simulated_fleet(tok) as (sim, client, fleet):
        generator = FleetGenerator(fleet, {URL: client}, current_version=lambda: 0, retries=0)
        cfg = RolloutConfig(
            evaluator="x.py:Length", group_size=4, max_new_tokens=12, apply_chat_template=False,
            sampling=SamplingConfig(temperature=1.0),
        )  # fmt: skip
        worker = RolloutWorker(cfg, tokenizer=tok, generator=generator, evaluator=Length())
        yield Rig(sim, client, fleet, worker)


def assert_token_exact(group: Group, bodies: list[dict[str, Any]]) -> None:
    """Every assistant token came from the server, in order, with its log-prob and version."""
    for traj in group.trajectories:
        assert traj.status is Status.OK, traj.failure_detail
        prompt, answer = traj.turns
        assert answer.loss_mask == [1] * len(answer.token_ids)
        assert len(answer.logprobs or []) == len(answer.token_ids)
        assert answer.versions[0].start == 0
        assert answer.versions[-1].end == len(answer.token_ids)
        assert bodies[0]["input_ids"][traj.sample_index] == prompt.token_ids


async def test_a_group_is_one_request_with_distinct_token_exact_samples(rig: Rig) -> None:
    group = await rig.worker.run_group(ITEM, VersionToken(lease_id=1, version=0), group_id="g1")
    bodies = list(rig.sim.engine.stats.bodies)
    assert len(bodies) == 1, "the first turn of a group is one request"
    assert len(bodies[0]["input_ids"]) == 4
    assert_token_exact(group, bodies)
    answers = [tuple(t.turns[1].token_ids) for t in group.trajectories]
    assert len(set(answers)) == 4, "the samples of a group must differ"
    server = rig.fleet.servers[0]
    assert all(rig.fleet.router.sticky_server(f"g1:{i}") is server for i in range(4))


async def test_interrupt_mid_group_resumes_each_sample_under_the_new_version(rig: Rig) -> None:
    long = RolloutConfig(
        evaluator="x.py:Length", group_size=3, max_new_tokens=40, apply_chat_template=False,
        sampling=SamplingConfig(temperature=1.0, ignore_eos=True),
    )  # fmt: skip
    worker = RolloutWorker(
        long, tokenizer=rig.worker.renderer.tokenizer, generator=rig.worker.generator,
        evaluator=Length(),
    )  # fmt: skip
    groups: list[Group] = []

    async def run() -> None:
        token = VersionToken(lease_id=2, version=0)
        groups.append(await worker.run_group(ITEM, token, group_id="g2"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await _until_tokens(rig.sim, 3)
        rig.fleet.pause_routing()  # what a publication in interrupt mode does
        await rig.client.pause_generation("abort")
        await rig.fleet.wait_drained()
        await rig.client.update_weights_from_disk("/w/1", weight_version=1)
        await rig.client.continue_generation()
        rig.fleet.resume_routing()
    (group,) = groups
    bodies = list(rig.sim.engine.stats.bodies)
    assert len(bodies[0]["input_ids"]) == 3
    resumes = bodies[1:]
    assert len(resumes) == 3, "each sample resumes alone"
    for traj in group.trajectories:
        assert traj.status is Status.OK, traj.failure_detail
        answer = traj.turns[1]
        assert len(answer.token_ids) == 40
        (old, new) = answer.versions
        assert (old.version, new.version) == (0, 1)
        assert 3 <= old.end == new.start < 40
        own_prefix = traj.turns[0].token_ids + answer.token_ids[: old.end]
        assert own_prefix in [body["input_ids"] for body in resumes]
        assert traj.head_version == 0
    assert len({tuple(t.turns[1].token_ids) for t in group.trajectories}) == 3


async def _until_tokens(sim: SimulatedServer, count: int) -> None:
    """Wait until every running sample has generated at least ``count`` tokens."""
    with anyio.fail_after(5):
        while True:
            running = list(sim.engine.requests.values())
            if running and all(len(r.output_ids) >= count for r in running):
                return
            await anyio.sleep(0.001)
