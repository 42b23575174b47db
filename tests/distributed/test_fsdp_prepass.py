"""Two gloo ranks that skip the policy's pre-pass (one minibatch, one epoch) train like one.

The same torchrun scenario as ``test_fsdp_equivalence.py`` (KL to a sharded reference as a loss
term, entropy bonus), with ``algorithm.minibatches = 1``: each rank captures its own rows' log-probs
and entropies during the training forward and the metrics are assembled over ranks. The step
metrics (``train/logprob_mismatch``, ``train/entropy``, ``train/kl`` included) and the exported
weights match one rank in-process within 1e-5.

Run: ``.venv/bin/python -m pytest tests/distributed/test_fsdp_prepass.py -q``
"""

from __future__ import annotations

import importlib.util
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


def _driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ranks_driver_prepass", DRIVER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_without_the_pre_pass_train_like_one(tmp_path: Path) -> None:
    driver = _driver()
    cfg = driver.prepare(tmp_path, driver.recipe(algorithm={"minibatches": 1}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(DRIVER), "train", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    two = json.loads((tmp_path / "out" / "rank0.json").read_text())

    torch.set_num_threads(1)
    one = Trainer.from_spec(TrainerSpec.from_recipe(cfg, tmp_path))
    assert one._skip_policy_pre_pass
    metrics = [one.step(batch) for batch in driver.batches()]
    for step, (expected, got) in enumerate(zip(metrics, two["metrics"], strict=True)):
        assert set(got) == set(expected), step
        assert {"train/logprob_mismatch", "train/entropy", "train/kl"} <= set(got)
        for key, value in expected.items():
            if key != "train/step_s":
                assert math.isfinite(got[key]), (step, key)
                assert got[key] == pytest.approx(value, abs=TOL, rel=TOL), (step, key)
    exported = load_file(tmp_path / "out" / "hf" / "model.safetensors")
    for name, param in one.model.named_parameters():
        torch.testing.assert_close(exported[name], param.detach(), atol=TOL, rtol=0, msg=name)
