"""The scheduler in-process (no HTTP): batching, aborts, pause modes, weight swaps, shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from nexrl_async.core.errors import EngineUnavailable, RequestRejected
from nexrl_async.inference.local.request import Request
from nexrl_async.inference.local.runner import ModelRunner
from nexrl_async.inference.local.sampling import SamplingSpec
from nexrl_async.inference.local.scheduler import Scheduler

PROMPT = [1, 5, 6, 14, 7]


def _req(rid: str, max_new: int = 20) -> Request:
    spec = SamplingSpec(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    return Request(rid=rid, prompt_ids=PROMPT, sampling=spec)


@asynccontextmanager
async def serving(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> AsyncIterator[Scheduler]:
    """A running scheduler (a fixture cannot hold a task group across setup and teardown)."""
    runner = ModelRunner(model, tokenizer, eos_ids=frozenset({2}), version="v0")
    sched = Scheduler(runner, max_batch=4, model_path="mem", weight_version="v0")
    async with anyio.create_task_group() as tg:
        await tg.start(sched.run)
        yield sched
        tg.cancel_scope.cancel()


async def _finish(*requests: Request) -> None:
    with anyio.fail_after(20):
        for req in requests:
            await req.done.wait()


async def test_requests_submitted_together_share_steps(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    async with serving(model, tokenizer) as scheduler:
        reqs = [_req(f"r{i}") for i in range(6)]
        await scheduler.submit(reqs)
        await _finish(*reqs)
        assert scheduler.stats.max_batch_size == 4  # capped by max_batch
        assert scheduler.stats.generated_tokens == 6 * 20
        assert scheduler.stats.steps < 6 * 20 / 2
        assert len({tuple(r.output_ids) for r in reqs}) == 1  # same prompt, greedy
        assert all(r.finish == {"type": "length", "length": 20} for r in reqs)


async def test_abort_running_and_waiting(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    async with serving(model, tokenizer) as scheduler:
        reqs = [_req(f"a{i}", max_new=300) for i in range(5)]  # the fifth waits (max_batch 4)
        await scheduler.submit(reqs)
        assert scheduler.abort("a4") == 1
        assert reqs[4].finish == {"type": "abort", "message": "Abort in waiting queue"}
        assert await scheduler.wait_until(lambda: len(reqs[0].output_ids) >= 2, 5)
        assert scheduler.abort(None) == 4
        await _finish(*reqs[:4])
        assert all(r.finish and r.finish["type"] == "abort" for r in reqs)
        assert all(0 < len(r.output_ids) < 300 for r in reqs[:4])
        assert scheduler.abort("unknown") == 0
        assert scheduler.idle


async def test_duplicate_rid_is_rejected(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    async with serving(model, tokenizer) as scheduler:
        first = _req("same", max_new=200)
        await scheduler.submit([first])
        with pytest.raises(RequestRejected, match="Duplicate request ID detected: same"):
            await scheduler.submit([_req("same")])
        scheduler.abort("same")
        await _finish(first)


@pytest.mark.parametrize("mode", ["in_place", "retract"])
async def test_pause_then_continue_gives_the_uninterrupted_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, mode: str
) -> None:
    async with serving(model, tokenizer) as scheduler:
        reference = _req("ref", max_new=40)
        await scheduler.submit([reference])
        await _finish(reference)
        req = _req("paused", max_new=40)
        await scheduler.submit([req])
        assert await scheduler.wait_until(lambda: len(req.output_ids) >= 3, 5)
        await scheduler.pause(mode)  # type: ignore[arg-type]
        made = len(req.output_ids)
        await anyio.sleep(0.1)
        assert len(req.output_ids) == made  # no progress while paused
        held = _req("held", max_new=2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.submit, [held])
            await anyio.sleep(0.05)
            assert held.phase.value == "waiting"
            assert held.rid not in scheduler._live
            scheduler.resume()
        await _finish(req, held)
        assert req.output_ids == reference.output_ids
        assert req.retractions == (1 if mode == "retract" else 0)


async def test_weight_update_waits_for_running_requests(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    async with serving(model, tokenizer) as scheduler:
        from safetensors.torch import save_file

        state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(tmp_path / "model.safetensors"))
        running = _req("long", max_new=150)
        await scheduler.submit([running])
        assert await scheduler.wait_until(lambda: bool(running.output_ids), 5)
        ok, message = await scheduler.update_weights(
            str(tmp_path), "v1", abort_all=False, flush_cache=True
        )
        assert (ok, message) == (True, "Succeeded to update model weights.")
        assert running.finish == {"type": "length", "length": 150}  # drained, not aborted
        assert running.weight_versions == [{"version": "v0", "start": 0, "end": 150}]
        after = _req("after", max_new=3)
        await scheduler.submit([after])
        await _finish(after)
        assert after.weight_versions == [{"version": "v1", "start": 0, "end": 3}]
        assert scheduler.weight_version == "v1"
        bad, message = await scheduler.update_weights(
            str(tmp_path / "missing"), "v2", abort_all=False, flush_cache=True
        )
        assert not bad
        assert "no *.safetensors" in message
        assert scheduler.weight_version == "v1"


async def test_shape_mismatch_leaves_weights_untouched(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    async with serving(model, tokenizer) as scheduler:
        from safetensors.torch import save_file

        state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        first = next(iter(state))
        state[first] = torch.zeros(3, 3)
        save_file(state, str(tmp_path / "model.safetensors"))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ok, message = await scheduler.update_weights(
            str(tmp_path), "v9", abort_all=True, flush_cache=True
        )
        assert not ok
        assert "shape mismatch" in message
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


async def test_close_aborts_and_refuses_new_requests(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    async with serving(model, tokenizer) as scheduler:
        running = _req("closing", max_new=300)
        await scheduler.submit([running])
        scheduler.close()
        await _finish(running)
        assert running.finish is not None
        assert running.finish["type"] == "abort"
        with pytest.raises(EngineUnavailable):
            await scheduler.submit([_req("late")])


async def test_cancelling_the_loop_mid_generation_returns_promptly(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    runner = ModelRunner(model, tokenizer, eos_ids=frozenset({2}), version="v0")
    sched = Scheduler(runner, max_batch=4, model_path="mem", weight_version="v0")
    req = _req("cut", max_new=400)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(sched.run)
            await sched.submit([req])
            assert await sched.wait_until(lambda: len(req.output_ids) >= 5, 5)
            tg.cancel_scope.cancel()
    assert not req.finished
