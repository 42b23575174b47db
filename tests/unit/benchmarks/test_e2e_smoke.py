"""benchmarks/e2e.py: the hand-written loop on a tiny config, its pieces against the engine's,
and the engine run's metrics/events parser on synthetic files."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from nexrl_async.algorithms import group_advantages
from nexrl_async.data.source import RowSource

Loader = Callable[[str], ModuleType]


@pytest.fixture
def bench(load_benchmark: Loader) -> ModuleType:
    return load_benchmark("e2e")


@pytest.fixture
def tiny(bench: ModuleType) -> Any:
    """The recipe's loop config shrunk to 4 prompts x 4 samples, 8 validation items."""
    cfg = bench.loop_config(bench.load_recipe(bench.RECIPE), steps=3, seed=0)
    val_items = cfg.val_items[:8]
    return dataclasses.replace(cfg, groups=4, group_size=4, val_every=2, val_items=val_items)


def test_the_loop_trains_a_few_steps_and_reports_timings_and_validations(bench, tiny):
    assert torch.get_num_threads() >= 1
    threads = torch.get_num_threads()
    result = bench.run_loop(tiny, log=lambda _: None)
    assert torch.get_num_threads() == threads  # restored
    steps = result["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert 0.0 <= s["reward_mean"] <= 1.0
        assert 1.0 <= s["response_len_mean"] <= tiny.max_new_tokens
        assert 16 <= s["tokens"] <= 16 * tiny.max_new_tokens  # 4 x 4 responses of 1-3 tokens
        parts = s["sample_s"] + s["update_s"] + s["validate_s"]
        assert 0.0 < parts <= s["step_s"] + 1e-6
        assert math.isfinite(s["grad_norm"])
        assert s["entropy"] > 0.0
    assert steps[1]["validate_s"] > steps[0]["validate_s"]  # validation due after step 1
    vals = result["validations"]
    assert [v["step"] for v in vals] == [0, 2, 3]  # before training, every 2, at the end
    times = [v["time_s"] for v in vals]
    assert times == sorted(times)
    assert 0.0 < times[-1] <= result["wall_s"]
    assert all(0.0 <= v["reward_mean"] <= 1.0 and 0.0 <= v["exact_mean"] <= 1.0 for v in vals)
    assert result["max_weight_change"] > 0.0
    assert result["cpu_s"] > 0.0
    initial = result.pop("initial_state")
    model, _ = bench.build_policy(tiny)
    for name, tensor in model.state_dict().items():
        assert torch.equal(initial[name], tensor), name  # the loop started from the seeded build
    bench.summarize(result, target=0.0, skip=1)
    assert result["s_per_step_median"] > 0.0
    assert result["target_step"] == 0  # reward >= 0 at the first validation
    assert result["final_val_reward_mean"] == vals[-1]["reward_mean"]
    assert result["cpu_s_per_step"] == result["cpu_s"] / 3
    json.dumps(result)  # JSON-able once the tensors are popped


def test_prompts_are_the_recipes_tokens_in_the_sources_order(bench, tiny):
    _, tok = bench.build_policy(tiny)
    first = tiny.train_items[0]
    ids = bench.encode(tok, first["prompt"])
    digits = first["digits"]
    assert ids == [tok.bos_token_id, *tok.convert_tokens_to_ids(list(digits)), tok.sep_token_id]
    recipe = bench.load_recipe(bench.RECIPE)
    rows = list(bench.load_callable(recipe, "task.py:make_items")(count=50, digits=2, seed=0))
    source = RowSource(rows, shuffle=True, seed=0)
    order = [source.next_item().fields for _ in range(50)]
    assert bench.shuffled(rows, shuffle=True, seed=0) == order
    assert tiny.score("21", " 21") == 1.0
    assert tiny.score("21", "2") == 0.5


def test_grpo_advantages_equal_the_engines(bench):
    rng = random.Random(3)
    rewards = torch.tensor([rng.choice([0.0, 0.5, 1.0]) for _ in range(40)])
    rewards[8:16] = 0.5  # a flat group
    ids = torch.arange(40) // 8
    ours = bench.grpo_advantages(rewards, 8)
    theirs = group_advantages(rewards, ids, estimator="grpo")
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert bool((ours[8:16] == 0).all())


def test_greedy_generation_stops_at_eos(bench, tiny):
    model, tok = bench.build_policy(tiny)
    prompts = [bench.encode(tok, item["prompt"]) for item in tiny.val_items[:6]]
    out = bench.generate(
        model, prompts, max_new_tokens=3, temperature=0.0, eos_id=tok.eos_token_id,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for row in out:
        assert 1 <= len(row) <= 3
        assert tok.eos_token_id not in row[:-1]
    with torch.no_grad():
        first = model(input_ids=torch.tensor(prompts)).logits[:, -1].argmax(-1).tolist()
    assert [row[0] for row in out] == first


def _write_jsonl(path: Path, rows: list[dict[str, Any]], torn: bool = False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + ('{"step": 9, "ti' if torn else ""), encoding="utf-8")


def _synthetic_run(run_dir: Path, *, with_events: bool) -> None:
    run_dir.mkdir()
    t0 = 1000.0
    step_s = [9.0, 5.0, 2.0, 3.0, 1.0, 4.0]
    metrics = []
    for step, s in enumerate(step_s):
        rec: dict[str, Any] = {"step": step, "time": t0 + 10 + sum(step_s[: step + 1])}
        rec |= {"timing/step_s": s, "train/step_s": s / 2, "train/reward_mean": 0.1 * step}
        if step in (0, 3):
            rec |= {"val/reward_mean": 0.5 if step == 0 else 0.85, "val/exact_mean": 0.1}
        metrics.append(rec)
    metrics.append({"step": 6, "time": t0 + 40, "val/reward_mean": 0.9, "val/exact_mean": 0.7})
    _write_jsonl(run_dir / "metrics.jsonl", metrics, torn=True)
    if with_events:
        events: list[dict[str, Any]] = [
            {"event": "run_started", "time": t0 + 4},
            {"event": "scored", "group_id": "val0-0", "reward": 1.0, "time": t0 + 5},
        ]
        for step, reward, at in ((0, 0.5, 8), (3, 0.85, 25), (6, 0.9, 39)):
            got = {"val/reward_mean": reward}
            events.append({"event": "validated", "step": step, "metrics": got, "time": t0 + at})
        _write_jsonl(run_dir / "events.jsonl", events)


def test_the_engine_parser_reads_steps_and_times_validations_by_the_events(bench, tmp_path):
    _synthetic_run(tmp_path / "run", with_events=True)
    run = bench.parse_engine_run(tmp_path / "run", launch_time=1000.0)
    assert [s["step"] for s in run["steps"]] == [0, 1, 2, 3, 4, 5]
    assert run["steps"][3]["train_s"] == 1.5
    assert [(v["step"], v["time_s"], v["reward_mean"]) for v in run["validations"]] == [
        (0, 8.0, 0.5), (3, 25.0, 0.85), (6, 39.0, 0.9),
    ]  # fmt: skip
    assert run["run_started_s"] == 4.0
    assert "events" in run["timing_source"]
    bench.summarize(run, target=0.8, skip=2)
    assert run["s_per_step_median"] == 2.5  # median of 2, 3, 1, 4: the first two steps skipped
    assert run["time_to_target_s"] == 25.0
    assert run["time_to_target_after_first_val_s"] == 17.0
    assert run["time_to_target_from_launch_s"] == 25.0  # the engine's times count from launch
    assert run["target_step"] == 3
    assert run["final_val_reward_mean"] == 0.9
    assert run["median_parts_s"]["train_s"] == 1.25


def test_without_events_the_metrics_line_times_are_used(bench, tmp_path):
    _synthetic_run(tmp_path / "run", with_events=False)
    run = bench.parse_engine_run(tmp_path / "run")  # origin: the first metrics line
    assert [v["step"] for v in run["validations"]] == [0, 3, 6]
    assert [v["time_s"] for v in run["validations"]] == [0.0, 10.0, 21.0]
    assert "upper bound" in run["timing_source"]
    bench.summarize(run, target=0.95)
    assert math.isnan(run["time_to_target_s"])
    assert run["target_step"] is None


def test_the_loop_pays_its_imports_in_the_time_from_launch(bench):
    start = bench.loop_start_s()
    assert 0.2 < start < 120.0  # a real interpreter importing torch and transformers
    run = {"steps": [], "validations": [{"step": 5, "time_s": 12.0, "reward_mean": 0.9}]}
    run["start_s"] = start
    bench.summarize(run, target=0.8)
    assert run["time_to_target_from_launch_s"] == pytest.approx(start + 12.0)


def test_ratios_argv_and_the_report(bench, tmp_path, capsys):
    engine = {"s_per_step_median": 2.0, "time_to_target_s": 100.0, "wall_s": 300.0}
    loop = {"s_per_step_median": 0.1, "time_to_target_s": math.nan, "wall_s": 30.0}
    r = bench.ratios(engine, loop)
    assert r["s_per_step_median"] == pytest.approx(20.0)
    assert math.isnan(r["time_to_target_s"])
    argv = bench.engine_argv(Path("r.toml"), tmp_path, steps=7, seed=3, sets=["a.b=1", "c=2"])
    assert argv[1:4] == ["-m", "nexrl_async", "run"]
    assert argv[-8:] == [
        "--set", "run.total_steps=7", "--set", "run.seed=3", "--set", "a.b=1", "--set", "c=2",
    ]  # fmt: skip
    _synthetic_run(tmp_path / "run", with_events=True)
    run = bench.parse_engine_run(tmp_path / "run", launch_time=1000.0)
    bench.summarize(run)
    results = {"engine": run, "target": 0.8, "skip_steps": 2}
    path = bench.plot(results, tmp_path, "e2e")
    assert path.stat().st_size > 0
    bench.print_summary(results)
    assert "s/step" in capsys.readouterr().out


def test_the_loops_figures_are_the_mean_of_its_runs_before_and_after_the_engine(bench):
    before = {key: 1.0 for key in bench.MEANS} | {"steps": ["before"]}
    after = {key: 3.0 for key in bench.MEANS} | {"steps": ["after"], "initial_state": {}}
    after["time_to_target_s"] = float("nan")  # the target missed once: no mean
    merged = bench.mean_loop([before, after])
    assert merged["s_per_step_median"] == 2.0
    assert math.isnan(merged["time_to_target_s"])
    assert merged["steps"] == ["after"]  # the curves are the last run's
    assert "initial_state" not in merged
