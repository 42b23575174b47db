"""LoRA under FSDP2 on two gloo ranks (torchrun) trains, checkpoints and exports like one rank.

``torchrun --standalone --nproc-per-node 2 ranks_driver.py train`` with ``[model.lora]`` in the
recipe: two RL steps (KL to a sharded reference, three minibatches, activation checkpointing),
a DCP round trip, an HF export and a weight sync. The same two steps on one rank in-process
must give the same metrics, the same merged weights (export and sync, within 1e-5) and the
same adapters; the checkpoint holds the adapters alone.

Run: ``.venv/bin/python -m pytest tests/distributed/test_lora_ranks.py -q``
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
from torch.distributed.checkpoint import FileSystemReader

from nexrl_async.train.checkpoint import MODEL_DIR
from nexrl_async.train.lora import ADAPTER_DIR
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

DRIVER = Path(__file__).with_name("ranks_driver.py")
TOL = 1e-5
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_lora_on_two_ranks_trains_like_one(tmp_path: Path, driver: ModuleType) -> None:
    cfg = driver.prepare(tmp_path, driver.recipe(model={"lora": LORA}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(DRIVER), "train", str(tmp_path)]
    run = subprocess.run(
        command,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = tmp_path / "out"
    two = json.loads((out / "rank0.json").read_text())

    torch.set_num_threads(1)
    one = Trainer.from_spec(TrainerSpec.from_recipe(cfg, tmp_path))
    base = dict(one.named_parameters_for_sync())
    metrics = [one.step(batch) for batch in driver.batches()]
    for step, (expected, got) in enumerate(zip(metrics, two["metrics"], strict=True)):
        assert set(got) == set(expected), step
        for key, value in expected.items():
            if key != "train/step_s":
                assert math.isfinite(got[key]), (step, key)
                assert got[key] == pytest.approx(value, abs=TOL, rel=TOL), (step, key)
    assert two["metrics"][0]["train/params_trainable_frac"] < 0.1
    restored = two["restored"]
    assert restored["logprobs"] == two["logprobs"]
    assert restored["moved"] != two["logprobs"]

    merged = dict(one.named_parameters_for_sync())
    moved = max(float((merged[n] - base[n]).abs().max()) for n in base)
    assert moved > 1e-3, "degenerate case: the update is too small to compare"
    exported = load_file(out / "hf" / "model.safetensors")
    synced = torch.load(out / "sync.pt")
    assert set(synced) == set(merged)
    assert set(merged) <= set(exported)  # plus the tied LM head
    for name, tensor in merged.items():
        torch.testing.assert_close(synced[name], tensor, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(exported[name], tensor, atol=TOL, rtol=0, msg=name)
    adapters = load_file(out / "hf" / ADAPTER_DIR / "adapter_model.safetensors")
    assert adapters
    assert all("lora_" in name for name in adapters)

    saved = FileSystemReader(out / "ckpt" / MODEL_DIR).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert model_keys == {n for n, p in one.model.named_parameters() if p.requires_grad}
