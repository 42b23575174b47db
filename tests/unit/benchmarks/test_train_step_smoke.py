"""benchmarks/train_step.py: synthetic data, the baseline does our step's work on the same
packed data, padding and publication summaries, and a ``--quick`` run end to end."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from nexrl_async.config.training import OptimConfig
from nexrl_async.train.microbatch import collate
from nexrl_async.train.packing import block_causal_mask

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


def tiny_args(bench: ModuleType) -> object:
    return bench.parse_args(["--quick"])


def test_the_synthetic_batch_has_groups_with_a_shared_prompt_and_long_tailed_answers(
    bench: ModuleType,
):
    args = bench.parse_args(["--groups", "3", "--group-size", "5", "--max-len", "300"])
    batch = bench.synthetic_batch(args, vocab_size=100, seed=1)
    assert [len(g.trajectories) for g in batch.groups] == [5, 5, 5]
    for group in batch.groups:
        prompts = {tuple(t.turns[0].token_ids) for t in group.trajectories}
        assert len(prompts) == 1
        for traj in group.trajectories:
            answer = traj.turns[1]
            assert 1 <= len(answer.token_ids) <= 300
            assert answer.loss_mask == [1] * len(answer.token_ids)
            assert len(answer.logprobs or []) == len(answer.token_ids)
            assert all(bench.FIRST_ID <= i < 100 for i in traj.token_ids)
    assert batch == bench.synthetic_batch(args, vocab_size=100, seed=1)
    rng = random.Random(0)
    lengths = sorted(bench.response_length(rng, 40, 0.9, 10_000) for _ in range(2000))
    assert 35 <= lengths[1000] <= 45  # the median
    assert lengths[-20] > 4 * lengths[1000]  # the long tail


def test_the_baseline_packs_what_the_trainer_packs(bench: ModuleType):
    setup = bench.step_setup(tiny_args(bench))
    micro = setup.bases["baseline"].micro
    assert [mb.rows for mb in micro] == setup.plan
    for mb in micro:
        ours = collate(setup.seq, mb.rows, torch.device("cpu"), packing=True).packed
        assert ours is not None
        assert torch.equal(mb.input_ids, ours.input_ids)
        assert torch.equal(mb.position_ids, ours.position_ids)
        assert torch.equal(mb.mask, block_causal_mask(ours))
        # loss weights: the loss mask shifted to the predicting position, never across rows
        assert float(mb.weights.sum()) == sum(float(setup.seq.loss_mask[r].sum()) for r in mb.rows)


def test_the_baseline_log_probs_equal_the_trainers(bench: ModuleType):
    setup = bench.step_setup(tiny_args(bench))
    gap = bench.logprob_gap(setup.trainer, setup.bases["baseline"], setup.batch)
    assert gap < 1e-5


def test_the_recompute_baseline_makes_our_update(bench: ModuleType):
    """Same weights, data, loss and optimizer: one step of each lands on the same weights.
    (eps = 1 keeps AdamW's first step linear in the gradient, so small differences stay small.)"""
    optim = OptimConfig(lr=0.5, eps=1.0, max_grad_norm=None)
    setup = bench.step_setup(tiny_args(bench), optim)
    base = setup.bases["baseline+recompute"]
    before = [p.detach().clone() for p in base.model.parameters()]
    setup.trainer.step(setup.batch)
    base.step()
    ours = list(setup.trainer.model.parameters())
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


def test_padding_fractions_of_both_mixes_per_budget(bench: ModuleType):
    args = bench.parse_args(["--padding-rows", "256", "--padding-batches", "2",
                             "--budgets", "2048", "8192", "--default-budget", "8192"])  # fmt: skip
    padding = bench.measure_padding(args)
    assert set(padding["mixes"]) == {"rl", "step"}
    for mix in padding["mixes"].values():
        for out in mix["budgets"].values():
            packed = out["packed"]["mean"]
            assert 0 <= out["packed_bound"]["mean"] <= packed <= out["packed"]["max"] < 1
            assert max(packed, out["padded"]["mean"]) < out["pad_to_longest"]["mean"]
    worst = padding["mixes"]["rl"]["budgets"]["8192"]["packed"]["max"]
    assert padding["packed_max_at_default"] == worst
    assert padding["passed"] == (worst <= 0.05)


def test_the_packing_bound_counts_whole_micro_batches(bench: ModuleType):
    assert bench.packing_bound([6, 6], 10) == pytest.approx(1 - 12 / 20)
    assert bench.packing_bound([5, 5], 10) == 0.0
    assert bench.packing_bound([25, 5], 10) == pytest.approx(1 - 30 / 35)  # 25 goes alone


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
    assert set(step["runs"]) == {"ours", "ours, packing off", "baseline", "baseline+recompute"}
    assert all(len(r["cpu_s"]) == 2 and r["tokens_per_cpu_s"] > 0 for r in step["runs"].values())
    assert step["logprob_max_abs_diff"] < 1e-5
    assert math.isfinite(step["ratio_vs_baseline"])
    assert step["ratio_vs_baseline"] > 0
    assert step["passed"] == (step["ratio_vs_baseline"] >= 0.9)
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
