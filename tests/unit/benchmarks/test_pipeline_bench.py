"""benchmarks/pipeline.py: recipe, simulated trainer, figures, and a tiny end-to-end run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from nexrl_async.config.inference import AttachInference
from nexrl_async.config.loader import load_recipe
from nexrl_async.config.preflight import preflight
from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionToken

Loader = Callable[[str], ModuleType]


@pytest.fixture
def bench(load_benchmark: Loader) -> ModuleType:
    return load_benchmark("pipeline")


def _record(step: int, step_s: float, wait_s: float, tokens_per_s: float) -> dict[str, Any]:
    return {
        "step": step, "timing/step_s": step_s, "pipeline/batch_wait_s": wait_s,
        "weights/publish_s": 0.1, "weights/pause_s": 0.05, "pipeline/gate_wait_s": 0.0,
        "throughput/tokens_per_s": tokens_per_s, "pipeline/staleness_mean": 1.0,
        "rollout/response_len_mean": 10.0,
    }  # fmt: skip


@pytest.mark.parametrize("key", ["sync", "k1", "k2", "fully"])
def test_the_recipe_of_each_mode_loads_and_attaches(bench: ModuleType, tmp_path: Path, key: str):
    args = bench.parse_args(["--steps", "4", "--train-s", "0.1"])
    mode = bench.MODES[key]
    loaded = load_recipe(bench.write_recipe(tmp_path, mode, "http://127.0.0.1:1", args))
    preflight(loaded)  # the task file's factory and evaluator import
    cfg = loaded.config
    assert isinstance(cfg.inference, AttachInference)
    assert cfg.inference.urls == ["http://127.0.0.1:1"]
    assert cfg.staleness.mode == mode.staleness
    assert cfg.staleness.k == mode.k
    assert cfg.run.total_steps == 4
    assert cfg.rollout.workers == 3 * args.batch_groups
    assert not cfg.logging.progress
    assert (cfg.validation.every_steps, cfg.validation.before_training) == (0, False)
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.at_end) == (0, False)


def test_the_task_gives_prompts_and_varied_rewards(bench: ModuleType, tmp_path: Path):
    args = bench.parse_args(["--train-s", "0.1"])
    bench.write_recipe(tmp_path, bench.MODES["sync"], "http://127.0.0.1:1", args)
    from nexrl_async.core.usercode import load_object

    items = list(load_object("bench_task.py:make_items", tmp_path)(count=3, digits=5, seed=1))
    assert [len(i["prompt"]) for i in items] == [5, 5, 5]
    evaluator = load_object("bench_task.py:RandomEvaluator", tmp_path)()
    rewards = {evaluator.evaluate(None, None).reward for _ in range(8)}
    assert len(rewards) == 8


def _batch(tokens: int) -> TrainBatch:
    token = VersionToken(lease_id=0, version=0, max_step=0)
    turns = [
        Turn(role="user", token_ids=[1, 2], loss_mask=[0, 0]),
        Turn(role="assistant", token_ids=[5] * tokens, loss_mask=[1] * tokens,
             logprobs=[-0.1] * tokens),
    ]  # fmt: skip
    traj = Trajectory(group_id="g0", item_key="0:0", sample_index=0, token=token, turns=turns)
    return TrainBatch(step=0, groups=[Group(group_id="g0", item_key="0:0", token=token,
                                            trajectories=[traj])])  # fmt: skip


def test_the_simulated_trainer_sleeps_and_exports_quickly(bench: ModuleType, tmp_path: Path):
    trainer = bench.SimulatedTrainer(train_s=0.05, tokenizer=object())
    start = time.perf_counter()
    metrics = trainer.step(_batch(tokens=7))
    assert time.perf_counter() - start >= 0.05
    assert metrics["train/samples"] == 1.0
    assert metrics["train/tokens"] == 7.0
    path = trainer.save_hf(tmp_path / "v1")
    assert json.loads((path / "config.json").read_text())["steps"] == 1


def test_summaries_skip_the_warmup_steps(bench: ModuleType):
    records = [_record(0, 9.0, 8.0, 10.0), _record(1, 2.0, 1.0, 100.0), _record(2, 4.0, 1.0, 50.0)]
    summary = bench.summarise_mode(records, warmup=1)
    assert summary["steps_measured"] == 2
    assert summary["step_s"] == pytest.approx(3.0)
    assert summary["step_s_median"] == pytest.approx(3.0)
    assert summary["steps_per_s"] == pytest.approx(2 / 6)
    assert summary["tokens_per_s"] == pytest.approx((200 + 200) / 6)
    assert summary["batch_wait_s"] == pytest.approx(1.0)
    assert summary["train_and_rest_s"] == pytest.approx(3.0 - 1.0 - 0.1)
    assert len(summary["per_step"]) == 3
    with pytest.raises(ValueError, match="no steps"):
        bench.summarise_mode(records, warmup=3)


def test_analysis_measures_against_t_gen_of_the_sync_run(bench: ModuleType):
    modes = {
        "sync": {"batch_wait_s": 1.0, "step_s": 2.1, "step_s_median": 2.0},
        "k1": {"step_s": 1.25, "step_s_median": 1.0},
    }
    analysis = bench.analyse(modes, train_s=0.8)
    assert analysis["t_gen_s"] == 1.0
    assert analysis["ideal_step_s"] == 1.0
    assert analysis["serial_step_s"] == pytest.approx(1.8)
    assert modes["k1"]["efficiency"] == pytest.approx(0.8)
    assert modes["k1"]["efficiency_of_median_step"] == pytest.approx(1.0)
    assert analysis["batch_async_k1_passed"] is False
    assert analysis["sync_step_over_serial"] == pytest.approx(2.1 / 1.8)
    modes["k1"]["step_s"] = 1.05
    assert bench.analyse(modes, train_s=0.8)["batch_async_k1_passed"] is True


@pytest.mark.slow
def test_a_tiny_run_of_every_mode_writes_json_and_plot(bench: ModuleType, tmp_path: Path):
    results = bench.main([
        "--steps", "3", "--warmup-steps", "1", "--batch-groups", "2", "--group-size", "2",
        "--train-s", "0.05", "--token-latency-s", "0.002", "--mean-output-tokens", "4",
        "--max-new-tokens", "8", "--out-dir", str(tmp_path),
    ])  # fmt: skip
    assert set(results["modes"]) == {"sync", "k1", "k2", "fully"}
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    assert saved["analysis"]["t_train_s"] == 0.05
    assert saved["analysis"]["t_gen_s"] > 0
    assert saved["modes"]["k1"]["steps_measured"] == 2
    assert saved["modes"]["k2"]["staleness_mean"] <= 2
    assert saved["modes"]["sync"]["staleness_mean"] == 0
    assert (tmp_path / "pipeline.png").stat().st_size > 10_000
