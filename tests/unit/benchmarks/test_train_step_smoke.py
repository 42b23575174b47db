"""benchmarks/train_step.py: the rows of both shapes, the plain padded baseline makes our
update with our log-probs, our plan on the demo rows, the timing summaries, padding and
publication summaries, and a ``--quick`` run end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from nexrl_async.config.training import OptimConfig
from nexrl_async.train.tensors import sequences_from_batch

Loader = Callable[[str], ModuleType]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def bench(load_benchmark: Loader) -> ModuleType:
    return load_benchmark("train_step")


@pytest.fixture
def rows(bench: ModuleType) -> ModuleType:
    """The shapes and the baseline, as ``train_step`` imports them (same module objects)."""
    return sys.modules["train_step_baseline"]


@pytest.fixture
def padding(bench: ModuleType) -> ModuleType:
    return sys.modules["train_step_padding"]


def tiny_args(bench: ModuleType) -> object:
    return bench.parse_args(["--quick"])


def test_the_synthetic_batch_has_groups_with_a_shared_prompt_and_long_tailed_answers(
    bench: ModuleType, rows: ModuleType
):
    args = bench.parse_args(["--groups", "3", "--group-size", "5", "--max-len", "300"])
    batch = rows.synthetic_batch(args, vocab_size=100, seed=1)
    assert [len(g.trajectories) for g in batch.groups] == [5, 5, 5]
    for group in batch.groups:
        prompts = {tuple(t.turns[0].token_ids) for t in group.trajectories}
        assert len(prompts) == 1
        for traj in group.trajectories:
            answer = traj.turns[1]
            assert 1 <= len(answer.token_ids) <= 300
            assert answer.loss_mask == [1] * len(answer.token_ids)
            assert len(answer.logprobs or []) == len(answer.token_ids)
            assert all(rows.FIRST_ID <= i < 100 for i in traj.token_ids)
    assert batch == rows.synthetic_batch(args, vocab_size=100, seed=1)
    rng = random.Random(0)
    lengths = sorted(rows.response_length(rng, 40, 0.9, 10_000) for _ in range(2000))
    assert 35 <= lengths[1000] <= 45  # the median
    assert lengths[-20] > 4 * lengths[1000]  # the long tail


def test_the_demo_shape_is_the_recipe_with_short_rows(bench: ModuleType, rows: ModuleType):
    shape = rows.demo_shape(tiny_args(bench))
    assert (shape.model.hidden_size, shape.model.num_hidden_layers, shape.vocab) == (64, 2, 14)
    assert shape.algorithm.entropy_coef > 0
    assert shape.trainer.packing
    batch = shape.batch
    assert (len(batch.groups), len(batch.groups[0].trajectories)) == (32, 8)
    lengths = [t.num_tokens for t in batch.trajectories]
    assert set(lengths) <= {5, 6, 7}
    assert 1600 <= sum(lengths) <= 1850  # the demo's ~1,740 tokens a step


@pytest.mark.parametrize("shape_name", ["demo", "long-tail"])
def test_the_baseline_pads_every_row_and_its_log_probs_equal_ours(
    bench: ModuleType, rows: ModuleType, shape_name: str
):
    shape = bench.SHAPES[shape_name](tiny_args(bench))
    runners, info = bench.shape_setup(shape)
    assert set(runners) == {"ours", "ours, packing off", "ours, always packed", "baseline"}
    base = runners["baseline"].__self__
    seq = sequences_from_batch(shape.batch, pad_token_id=0)
    assert base.input_ids.shape == (seq.size, int(seq.lengths.max()))  # one padded batch
    assert info["logprob_max_abs_diff"] < 1e-5
    assert info["plan"]["layout"] in ("packed", "padded")


def test_on_the_demo_rows_our_plan_is_one_padded_micro_batch(bench: ModuleType, rows: ModuleType):
    _, info = bench.shape_setup(rows.demo_shape(tiny_args(bench)))
    assert info["plan"]["layout"] == "padded"
    assert info["plan"]["micro_batches"] == 1


def test_always_packed_takes_the_cost_model_away_for_a_while(rows: ModuleType):
    from nexrl_async.train import step
    from nexrl_async.train.ranks import lockstep

    model = rows.demo_shape(argparse.Namespace(seed=0)).new_model()
    with rows.always_packed():
        assert step.plan_costs(model) is None
        assert lockstep.plan_costs(model) is None
    assert step.plan_costs(model) is not None
    assert lockstep.plan_costs(model) is not None


@pytest.mark.parametrize("shape_name", ["demo", "long-tail"])
def test_the_baseline_makes_our_update(bench: ModuleType, rows: ModuleType, shape_name: str):
    """Same weights, rows, loss (with the demo's entropy bonus) and optimizer: one step of each
    lands on the same weights. (eps = 1 keeps AdamW's first step linear in the gradient, so
    small differences stay small.)"""
    optim = OptimConfig(lr=0.5, eps=1.0, max_grad_norm=None)
    shape = dataclasses.replace(bench.SHAPES[shape_name](tiny_args(bench)), optim=optim)
    trainer = shape.new_trainer()
    seq = sequences_from_batch(shape.batch, pad_token_id=0)
    base = rows.PaddedStep(shape.new_model(), seq, shape)
    before = [p.detach().clone() for p in base.model.parameters()]
    trainer.step(shape.batch)
    base.step()
    ours = list(trainer.model.parameters())
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(ours, before, strict=True))
    assert moved > 1e-3, "the update must move the weights for this test to mean anything"
    for mine, theirs in zip(ours, base.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-4)


def test_timed_rounds_rotate_and_drop_the_warmup(bench: ModuleType):
    calls: list[str] = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = bench.timed_rounds(runners, warmup=1, steps=2)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {len(t["cpu_s"]) for t in times.values()} == {2}
    runs = bench.summarise_runs({"a": {"cpu_s": [1.0, 3.0, 2.0], "wall_s": [4.0] * 3}}, 100)
    assert runs["a"]["median_cpu_s"] == 2.0
    assert runs["a"]["tokens_per_cpu_s"] == 50.0
    assert runs["a"]["tokens_per_wall_s"] == 25.0


def test_slowdowns_are_against_the_baseline_overall_and_round_by_round(bench: ModuleType):
    times = {
        "ours": {"cpu_s": [2.0, 2.0, 9.0], "wall_s": [2.0, 2.0, 2.0]},
        "baseline": {"cpu_s": [1.0, 2.0, 3.0], "wall_s": [1.0, 1.0, 1.0]},
    }
    out = bench.slowdowns(bench.summarise_runs(times, 10))
    assert out["baseline"] == {"cpu": 1.0, "wall": 1.0, "paired_cpu": 1.0}
    assert out["ours"]["cpu"] == 1.0  # medians 2 / 2
    assert out["ours"]["paired_cpu"] == 2.0  # rounds 2, 1, 3
    assert out["ours"]["wall"] == 2.0


def test_padding_fractions_of_both_mixes_per_budget(bench: ModuleType, padding: ModuleType):
    args = bench.parse_args(["--padding-rows", "256", "--padding-batches", "2",
                             "--budgets", "2048", "8192", "--default-budget", "8192"])  # fmt: skip
    out = padding.measure_padding(args)
    assert set(out["mixes"]) == {"rl", "step"}
    for mix in out["mixes"].values():
        for found in mix["budgets"].values():
            packed = found["packed"]["mean"]
            assert 0 <= found["packed_bound"]["mean"] <= packed <= found["packed"]["max"] < 1
            assert max(packed, found["padded"]["mean"]) < found["pad_to_longest"]["mean"]
    worst = out["mixes"]["rl"]["budgets"]["8192"]["packed"]["max"]
    assert out["packed_max_at_default"] == worst
    assert out["passed"] == (worst <= 0.05)


def test_the_packing_bound_counts_whole_micro_batches(padding: ModuleType):
    assert padding.packing_bound([6, 6], 10) == pytest.approx(1 - 12 / 20)
    assert padding.packing_bound([5, 5], 10) == 0.0
    assert padding.packing_bound([25, 5], 10) == pytest.approx(1 - 30 / 35)  # 25 goes alone


def test_publication_summaries_leave_the_first_out(load_benchmark: Loader):
    publish = load_benchmark("train_step_publish")
    runs = [
        {"bytes": 2e9, "export_s": 9.0, "pause_s": 9.0, "transfer_s": 9.0, "total_s": 20.0},
        {"bytes": 2e9, "export_s": 1.0, "pause_s": 2.0, "transfer_s": 1.5, "total_s": 3.0},
        {"bytes": 2e9, "export_s": 1.0, "pause_s": 2.0, "transfer_s": 1.5, "total_s": 5.0},
    ]
    summary = publish.summarise_publications(runs)
    assert (summary["median_total_s"], summary["first_total_s"]) == (4.0, 20.0)
    assert summary["measured"] == 2
    assert summary["gbytes_per_s"] == pytest.approx(0.5)
    assert publish.summarise_publications(runs[:1])["median_total_s"] == 20.0


@pytest.mark.slow
def test_a_quick_run_measures_all_three_and_writes_json_and_plot(bench: ModuleType, tmp_path: Path):
    results = bench.main(["--quick", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "train_step.json").read_text())
    step, padding, publish = saved["step"], saved["padding"], saved["publish"]
    assert set(step["shapes"]) == {"demo", "long-tail"}
    for shape in step["shapes"].values():
        runs = shape["runs"]
        assert set(runs) == {"ours", "ours, packing off", "ours, always packed", "baseline"}
        assert all(len(r["cpu_s"]) == 2 and r["tokens_per_cpu_s"] > 0 for r in runs.values())
        assert shape["logprob_max_abs_diff"] < 1e-5
        assert math.isfinite(shape["slowdown_vs_baseline"])
        assert shape["slowdown_vs_baseline"] > 0
        assert shape["passed"] == (shape["slowdown_vs_baseline"] <= 1.2)
    assert step["shapes"]["demo"]["plan"]["layout"] == "padded"
    assert step["passed"] == all(s["passed"] for s in step["shapes"].values())
    assert set(padding["mixes"]["rl"]["budgets"]) == {"512", "1024"}
    model_bytes = publish["model"]["bytes"]
    transports = publish["transports"]
    assert set(transports) == {"disk", "distributed_1mb"}
    for summary in transports.values():
        assert len(summary["runs"]) == 2
        assert all(r["total_s"] > 0 for r in summary["runs"])
    assert {r["bytes"] for r in transports["distributed_1mb"]["runs"]} == {model_bytes}
    assert all(r["bytes"] > model_bytes for r in transports["disk"]["runs"])  # + config, tokenizer
    assert results["publish"]["speedup_vs_disk"]["disk"] == 1.0
    assert (tmp_path / "train_step.png").stat().st_size > 10_000
