"""benchmarks/inference.py: load generation, same bodies for both senders, figures, smoke runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import anyio
import httpx
import pytest

from nexrl_async.inference.client.sglang import SamplingParams
from nexrl_async.testing.simulated import SimulatedConfig, SimulatedServer

Loader = Callable[[str], ModuleType]


@pytest.fixture
def bench(load_benchmark: Loader) -> ModuleType:
    return load_benchmark("inference")


async def test_drive_keeps_the_concurrency_and_stops_after_the_duration(bench: ModuleType):
    in_flight, peak = [0], [0]

    async def send() -> int:
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await anyio.sleep(0.01)
        in_flight[0] -= 1
        return 3

    start = anyio.current_time()
    requests, tokens = await bench.drive(send, concurrency=4, duration_s=0.1)
    elapsed = anyio.current_time() - start
    assert peak[0] == 4
    assert 0.1 <= elapsed < 0.5
    assert 4 * 5 <= requests <= 4 * 12
    assert tokens == 3 * requests


async def test_drive_propagates_a_failing_request(bench: ModuleType):
    async def send() -> int:
        raise RuntimeError("server said no")

    with pytest.raises(ExceptionGroup) as info:
        await bench.drive(send, concurrency=2, duration_s=1.0)
    assert info.group_contains(RuntimeError, match="server said no")


async def test_both_senders_post_the_same_body_but_the_rid(bench: ModuleType):
    sim = SimulatedServer(SimulatedConfig(mean_output_tokens=4))
    sampling = SamplingParams(max_new_tokens=5, ignore_eos=True, temperature=1.0)
    async with sim.serve() as url:
        for kind in ("client", "httpx"):
            async with bench.sender(kind, url, [7, 8, 9], sampling) as send:
                assert await send() == 5
    client_body, httpx_body = list(sim.engine.stats.bodies)[-2:]
    assert client_body.pop("rid") != httpx_body.pop("rid")
    assert client_body == httpx_body
    assert client_body["sampling_params"] == {
        "max_new_tokens": 5, "ignore_eos": True, "temperature": 1.0,
    }  # fmt: skip


def _trial(bench: ModuleType, kind: str, requests: int, cpu_s: float = 0.02) -> object:
    return bench.Trial(kind=kind, requests=requests, tokens=requests * 2, wall_s=1.0, cpu_s=cpu_s)


def test_the_client_ratio_is_of_medians_from_the_same_run(bench: ModuleType):
    trials = [_trial(bench, "client", n) for n in (80, 90, 300)]
    trials += [_trial(bench, "httpx", n) for n in (100, 100, 10)]
    summary = bench.client_summary(trials)
    assert summary["client_requests_per_s"] == 90
    assert summary["httpx_requests_per_s"] == 100
    assert summary["ratio"] == pytest.approx(0.9)
    assert summary["passed"] is True
    assert summary["client_cpu_us_per_request"] == pytest.approx(1e6 * 0.02 / 90)
    assert summary["client_requests_per_cpu_s"] == pytest.approx(90 / 0.02)


def test_a_client_under_2000_requests_per_cpu_second_fails(bench: ModuleType):
    trials = [_trial(bench, "client", 100, cpu_s=0.06), _trial(bench, "httpx", 100, cpu_s=0.5)]
    summary = bench.client_summary(trials)
    assert summary["ratio"] == pytest.approx(1.0)
    assert summary["client_requests_per_cpu_s"] == pytest.approx(100 / 0.06)
    assert summary["passed"] is False


def test_the_batching_speedup_is_highest_over_lowest_level(bench: ModuleType):
    def row(level: int, rate: float, index: int) -> dict[str, float]:
        return {"concurrency": level, "round": index, "tokens_per_s": rate, "mean_latency_s": 1.0,
                "mean_batch": level, "wall_ms_per_step": 2.0,
                "tokens_per_server_cpu_s": rate}  # fmt: skip

    trials = [row(1, 100.0, 0), row(32, 450.0, 0), row(1, 90.0, 1), row(32, 480.0, 1)]
    summary = bench.local_summary([1, 32], trials)
    assert [r["tokens_per_s"] for r in summary["levels"]] == [95.0, 465.0]
    assert summary["speedup"] == pytest.approx(465 / 95)
    assert summary["passed"] is False


@pytest.mark.slow
def test_a_tiny_client_run_writes_json_and_plot(bench: ModuleType, tmp_path: Path):
    bench.main([
        "--part", "client", "--trials", "2", "--duration-s", "0.3", "--concurrency", "4",
        "--out-dir", str(tmp_path),
    ])  # fmt: skip
    saved = json.loads((tmp_path / "inference.json").read_text())
    client = saved["client"]
    assert [t["kind"] for t in client["trials"]] == ["client", "httpx", "httpx", "client"]
    assert client["client_requests_per_s"] > 0
    assert client["httpx_requests_per_s"] > 0
    assert "local" not in saved
    assert (tmp_path / "inference.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_tiny_local_server_run_reports_each_level(bench: ModuleType, tmp_path: Path):
    results = bench.main([
        "--part", "local", "--local-concurrency", "1", "4", "--local-duration-s", "0.5",
        "--rounds", "1", "--max-new-tokens", "8", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    levels = results["local"]["levels"]
    assert [r["concurrency"] for r in levels] == [1, 4]
    assert levels[0]["mean_batch"] == pytest.approx(1.0)
    assert levels[1]["mean_batch"] > 1.0
    assert (tmp_path / "inference.png").exists()


def test_demo_loop_cpu_is_per_sample_over_the_counted_steps(load_benchmark: Loader) -> None:
    demo = load_benchmark("inference_demo")
    metrics = [{"timing/step_s": s, "rollout/samples": 256.0} for s in (9.0, 1.0, 2.0, 3.0)]
    metrics[2]["val/samples"] = 64.0
    readings = [
        demo.Sample(wall_s=1.0, steps=1, loop_cpu_s=5.0, server_cpu_s=1.0),
        demo.Sample(wall_s=2.0, steps=2, loop_cpu_s=6.0, server_cpu_s=2.0),  # step 1 logged
        demo.Sample(wall_s=4.0, steps=4, loop_cpu_s=6.576, server_cpu_s=3.152),  # last step
    ]
    run = demo.DemoRun(src="x", samples=readings, metrics=metrics)
    summary = demo.summarize(run, warmup_steps=1)
    assert summary["steps_counted"] == 3
    assert summary["step_s_median"] == 2.0
    assert summary["samples"] == 256 + 64 + 256  # the steps after the first counted one
    assert summary["loop_cpu_ms_per_sample"] == pytest.approx(1.0)
    assert summary["server_cpu_ms_per_sample"] == pytest.approx(2.0)
    assert summary["window_wall_s"] == 2.0


async def test_the_zero_server_answers_keep_alive_requests_at_once(load_benchmark: Loader):
    zero = load_benchmark("zero_server")
    import asyncio

    loop = asyncio.get_running_loop()
    server = await loop.create_server(zero.ZeroProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(3):
                response = await http.post(f"http://127.0.0.1:{port}/generate", json={"a": 1})
                assert response.json()["output_ids"] == zero.OUTPUT_IDS
            assert (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    finally:
        server.close()
