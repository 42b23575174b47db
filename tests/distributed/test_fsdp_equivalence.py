"""FSDP2 over two gloo ranks trains exactly like one rank.

``torchrun --standalone --nproc-per-node 2 ranks_driver.py train`` runs rank 0's
DistributedTrainer and rank 1's follower loop (which first gets a SIGTERM it must ignore: rank 0
decides when followers stop) for two RL steps (KL to a sharded reference,
entropy bonus, three minibatches of which one holds a single row, so one rank trains filler
micro-batches only; activation checkpointing; clipped gradients), then log-probs, a DCP
checkpoint round trip (save, a third step, load), an HF export and a weight sync. This test
repeats the two steps on one rank in-process and compares: the step metrics, the updated
weights (exported and synced, after the round trip) and the log-probs agree within 1e-5, and
the update is large enough (> 1e-3) for that to mean something.

Run: ``.venv/bin/python -m pytest tests/distributed/test_fsdp_equivalence.py -q``
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

DRIVER = Path(__file__).with_name("ranks_driver.py")
TOL = 1e-5


def _torchrun(work: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(DRIVER),
        "train",
        str(work),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_under_torchrun_train_like_one(tmp_path: Path, driver: ModuleType) -> None:
    cfg = driver.prepare(tmp_path, driver.recipe())
    run = _torchrun(tmp_path, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = tmp_path / "out"
    assert (out / "exit0").read_text() == "0"
    assert (out / "exit1").read_text() == "0"
    two = json.loads((out / "rank0.json").read_text())

    torch.set_num_threads(1)
    one = Trainer.from_spec(TrainerSpec.from_recipe(cfg, tmp_path))
    before = {name: p.detach().clone() for name, p in one.model.named_parameters()}
    metrics = [one.step(batch) for batch in driver.batches()]
    logprobs = one.compute_logprobs(driver.batches()[0])

    for step, (expected, got) in enumerate(zip(metrics, two["metrics"], strict=True)):
        assert set(got) == set(expected), step
        for key, value in expected.items():
            if key == "train/step_s":
                continue
            assert math.isfinite(got[key]), (step, key)
            assert got[key] == pytest.approx(value, abs=TOL, rel=TOL), (step, key)
    assert two["metrics"][0]["train/optimizer_steps"] == 3.0
    assert two["metrics"][0]["train/grad_norm"] > 0.5  # the clip engaged
    for expected_row, got_row in zip(logprobs, two["logprobs"], strict=True):
        torch.testing.assert_close(
            torch.tensor(got_row), torch.tensor(expected_row), atol=TOL, rtol=0
        )

    restored = two["restored"]
    assert restored["steps_done"] == 2
    assert restored["logprobs"] == two["logprobs"]  # the same weights, the same numbers
    assert restored["moved"] != two["logprobs"]  # the third step did change them

    after = {name: p.detach() for name, p in one.model.named_parameters()}
    moved = max(float((after[name] - before[name]).abs().max()) for name in before)
    assert moved > 1e-3, "degenerate case: the update is too small to compare"
    exported = load_file(out / "hf" / "model.safetensors")
    synced = torch.load(out / "sync.pt")
    assert set(synced) == set(after)
    assert set(after) <= set(exported)  # plus the tied LM head
    for name, param in after.items():
        torch.testing.assert_close(synced[name], param, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(exported[name], param, atol=TOL, rtol=0, msg=name)
