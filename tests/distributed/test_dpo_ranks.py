"""DPO over two gloo ranks under torchrun takes the step one rank takes.

``torchrun --standalone --nproc-per-node 2 ranks_driver.py train`` runs rank 0's
DistributedTrainer and rank 1's follower with a DPO recipe on batches of preference pairs
(ragged rows, micro-batches of 16 tokens, so a pair's two rows land in different micro-batches
and on different ranks): two steps, log-probs, a checkpoint round trip, an HF export and a weight
sync. This test takes the two steps on one rank in-process and compares the metrics (``train/loss``
is ln 2 at step 0 on both), the log-probs and the updated weights within 1e-5.

Run: ``.venv/bin/python -m pytest tests/distributed/test_dpo_ranks.py -q``
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import msgspec
import pytest
import torch

from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionToken
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

DRIVER = Path(__file__).with_name("ranks_driver.py")
TOL = 1e-5
TOKEN = VersionToken(lease_id=0, version=0)
PAIRS = [  # (prompt, chosen, rejected), token ids < 14 (the char vocabulary)
    ([1, 4, 5], [5, 4, 2], [4, 5, 2]),
    ([1, 7, 8, 9], [9, 8, 7, 2], [9, 8, 6, 6, 6, 6, 2]),
    ([1, 3], [3, 2], [3, 3, 3, 3, 3, 3, 3, 3, 2]),
    ([1, 6, 10, 11, 12], [12, 11, 10, 6, 2], [12, 2]),
]


def _traj(group: str, index: int, prompt: list[int], response: list[int]) -> Trajectory:
    return Trajectory(
        group_id=group,
        item_key=group,
        sample_index=index,
        token=TOKEN,
        turns=[
            Turn(role="user", token_ids=prompt, loss_mask=[0] * len(prompt)),
            Turn(role="assistant", token_ids=response, loss_mask=[1] * len(response)),
        ],
    )


def pair_batches() -> list[TrainBatch]:
    groups = [
        Group(
            group_id=f"p{i}",
            item_key=f"p{i}",
            token=TOKEN,
            trajectories=[_traj(f"p{i}", 0, p, c), _traj(f"p{i}", 1, p, r)],
        )
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    return [TrainBatch(step=step, groups=groups) for step in range(2)]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_dpo_on_two_ranks_under_torchrun_trains_like_one(
    tmp_path: Path, driver: ModuleType
) -> None:
    algorithm = {
        "mode": "dpo",
        "minibatches": 1,
        "entropy_coef": 0.0,
        "kl": {"placement": "none"},
        "dpo": {"beta": 0.5},
    }
    cfg = driver.prepare(tmp_path, driver.recipe(algorithm=algorithm))
    batches = pair_batches()
    for i, batch in enumerate(batches):
        (tmp_path / f"batch{i}.msgpack").write_bytes(msgspec.msgpack.encode(batch))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(DRIVER), "train", str(tmp_path)]
    run = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    two = json.loads((tmp_path / "out" / "rank0.json").read_text())

    torch.set_num_threads(1)
    one = Trainer.from_spec(TrainerSpec.from_recipe(cfg, tmp_path))
    assert one.algorithm.mode == "dpo"
    assert one.reference is not None
    before = {name: p.detach().clone() for name, p in one.model.named_parameters()}
    metrics = [one.step(batch) for batch in batches]
    assert abs(metrics[0]["train/loss"] - math.log(2)) < 1e-6
    assert abs(two["metrics"][0]["train/loss"] - math.log(2)) < 1e-6
    for step, (expected, got) in enumerate(zip(metrics, two["metrics"], strict=True)):
        assert set(got) == set(expected), step
        for key, value in expected.items():
            if key != "train/step_s":
                assert got[key] == pytest.approx(value, abs=TOL, rel=TOL), (step, key)
    assert metrics[1]["train/preference_accuracy"] > 0.0  # the first step moved the margins
    for expected_row, got_row in zip(
        one.compute_logprobs(batches[0]), two["logprobs"], strict=True
    ):
        torch.testing.assert_close(
            torch.tensor(got_row), torch.tensor(expected_row), atol=TOL, rtol=0
        )
    assert two["restored"]["logprobs"] == two["logprobs"]

    after = {name: p.detach() for name, p in one.model.named_parameters()}
    assert max(float((after[n] - before[n]).abs().max()) for n in before) > 1e-3
    synced = torch.load(tmp_path / "out" / "sync.pt")
    for name, param in after.items():
        torch.testing.assert_close(synced[name], param, atol=TOL, rtol=0, msg=name)
