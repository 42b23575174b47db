"""The first-turn batcher's window: a window that fills every server's batch goes at once."""

from __future__ import annotations

import anyio
import pytest

from nexrl_async.engine.first_turns import Answer, Batch, FirstTurnBatcher
from nexrl_async.inference.client.structs import FinishReason, GenerateResult, SamplingParams

PARAMS = SamplingParams(max_new_tokens=1)
LENGTH = FinishReason(type="length", length=1)


class Recorder:
    """A send that answers every sample at once and records each batch's group count."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def __call__(self, batch: Batch) -> tuple[list[Answer], str]:
        self.batches.append(len(batch.turns))
        answers: list[Answer] = [
            GenerateResult(
                rid=key, output_ids=[1], output_logprobs=None, finish_reason=LENGTH,
                weight_version=None,
            )
            for key in batch.keys
        ]  # fmt: skip
        return answers, "http://server"


async def submit_all(batcher: FirstTurnBatcher, groups: int, size: int = 4) -> float:
    """Submit ``groups`` group turns together; the seconds until all were answered."""
    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for g in range(groups):
            keys = [f"g{g}-{i}" for i in range(size)]
            tg.start_soon(batcher.submit, [g], keys, PARAMS)
    return anyio.current_time() - start


@pytest.mark.parametrize("servers", [1, 2])
async def test_a_window_that_fills_every_servers_batch_is_sent_at_once(servers: int) -> None:
    send = Recorder()
    batcher = FirstTurnBatcher(send, window_s=30.0, servers=lambda: servers, server_batch=8)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.serve)
        await anyio.wait_all_tasks_blocked()
        with anyio.fail_after(5):  # not the 30 s window
            await submit_all(batcher, groups=2 * servers)
        assert send.batches == [2] * servers
        tg.cancel_scope.cancel()


async def test_turns_past_a_full_window_wait_in_the_next_one() -> None:
    send = Recorder()
    batcher = FirstTurnBatcher(send, window_s=0.2, servers=lambda: 1, server_batch=8)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.serve)
        await anyio.wait_all_tasks_blocked()
        took = await submit_all(batcher, groups=3)
        assert send.batches == [2, 1]  # the third group waited out its own window
        assert took >= 0.2
        tg.cancel_scope.cancel()


async def test_without_a_server_batch_the_window_runs_out() -> None:
    send = Recorder()
    batcher = FirstTurnBatcher(send, window_s=0.2, servers=lambda: 1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.serve)
        await anyio.wait_all_tasks_blocked()
        took = await submit_all(batcher, groups=8)
        assert send.batches == [8]
        assert took >= 0.2
        tg.cancel_scope.cancel()
