"""Two gloo ranks with global denominators reproduce the one-rank loss and gradients.

The batch is split unevenly over two ranks, each shard trimmed to its own padded width (as a
micro-batch would be). Each rank all-reduces ``aggregation_denominator`` of its shard, computes
``policy_loss + coef · KL`` with that global denominator, and all-reduces the loss. The summed
loss and the per-rank gradients w.r.t. ``logprobs`` must equal the single-rank full-batch ones,
for every aggregation mode.

The ranks are two subprocesses running this file as a script (rather than
``torch.multiprocessing.spawn``): pytest's importlib import mode leaves this module unimportable
by name in a spawned child, and a script needs no import at all.

Run: ``.venv/bin/python -m pytest tests/distributed/test_algorithms_ranks.py -q``
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nexrl_async.algorithms import aggregate, aggregation_denominator, kl_estimate, policy_loss
from nexrl_async.algorithms.aggregation import AggMode

MODES: tuple[AggMode, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
ROWS, WIDTH = 8, 10
SPLIT = 3  # rank 0 gets rows [0, 3), rank 1 rows [3, 8)
KL_COEF = 0.1
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _batch() -> Batch:
    """``(logprobs, old_logprobs, ref_logprobs, advantages, mask)``, the same on every rank."""
    generator = torch.Generator().manual_seed(1234)
    old = -torch.rand(ROWS, WIDTH, generator=generator) * 4
    logprobs = old + torch.randn(ROWS, WIDTH, generator=generator) * 0.5  # some tokens clip
    ref = old + torch.randn(ROWS, WIDTH, generator=generator) * 0.3
    advantages = torch.randn(ROWS, generator=generator)
    lengths = torch.tensor([10, 3, 0, 7, 1, 4, 9, 2])  # ragged, one empty row
    mask = torch.arange(WIDTH).unsqueeze(0) < lengths.unsqueeze(1)
    return logprobs, old, ref, advantages, mask


def _shard(batch: Batch, rank: int) -> Batch:
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, ROWS)
    mask = batch[4][rows]
    width = max(int(mask.sum(dim=-1).max()), 1)
    logprobs, old, ref, advantages, _ = batch
    return (
        logprobs[rows, :width],
        old[rows, :width],
        ref[rows, :width],
        advantages[rows],
        mask[:, :width],
    )


def _loss(batch: Batch, mode: AggMode, denominator: torch.Tensor | None) -> torch.Tensor:
    logprobs, old, ref, advantages, mask = batch
    pg, _ = policy_loss(
        logprobs,
        old,
        advantages,
        mask,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip_c=3.0,
        agg=mode,
        denominator=denominator,
        norm_constant=WIDTH,
    )
    kl = kl_estimate(logprobs, ref, "k3")
    return pg + KL_COEF * aggregate(kl, mask, mode, denominator=denominator, norm_constant=WIDTH)


def _rank_main(rank: int, world_size: int, init_file: Path, out_dir: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results: dict[str, dict[str, torch.Tensor]] = {}
        for mode in MODES:
            logprobs, old, ref, advantages, mask = _shard(_batch(), rank)
            logprobs = logprobs.clone().requires_grad_(True)
            denominator = aggregation_denominator(mask, mode)
            dist.all_reduce(denominator)
            loss = _loss((logprobs, old, ref, advantages, mask), mode, denominator)
            (grad,) = torch.autograd.grad(loss, logprobs)
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[mode] = {"loss": total, "grad": grad}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_match_one_rank(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    init_file = tmp_path / "pg_init"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), "2", str(init_file), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for rank in range(2)
    ]
    try:
        for rank, proc in enumerate(procs):
            output, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"rank {rank} failed:\n{output.decode()}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for mode in MODES:
        batch = _batch()
        logprobs = batch[0].clone().requires_grad_(True)
        full = _loss((logprobs, *batch[1:]), mode, None)
        (full_grad,) = torch.autograd.grad(full, logprobs)
        assert full.abs().item() > 1e-3, "degenerate case: the loss is ~0"
        for rank, result in enumerate(ranks):
            assert abs(result[mode]["loss"].item() - full.item()) <= 1e-6, (mode, rank)
            rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, ROWS)
            grad = result[mode]["grad"]
            width = grad.shape[-1]
            torch.testing.assert_close(grad, full_grad[rows, :width], atol=1e-6, rtol=0)
            assert torch.equal(full_grad[rows, width:], torch.zeros_like(full_grad[rows, width:]))


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
