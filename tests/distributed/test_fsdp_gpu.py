"""FSDP2's GPU path (NCCL, bf16 compute with float32 master weights and reductions), and the
sharding helpers that decide it.

The two-GPU test needs two CUDA devices (skipped elsewhere); the helpers run anywhere.

Run: ``.venv/bin/python -m pytest tests/distributed/test_fsdp_gpu.py -q``
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
from transformers import PreTrainedModel

from nexrl_async.config.model import BuiltModel, CharTokenizer
from nexrl_async.core.errors import TrainError
from nexrl_async.train.build import build_char_tokenizer, build_model_for
from nexrl_async.train.ranks.sharding import decoder_layers, mixed_precision, shard_model
from nexrl_async.train.ranks.topology import ProcessGroups, Topology

DRIVER = Path(__file__).with_name("ranks_driver.py")


@pytest.fixture
def tiny() -> PreTrainedModel:
    tok = build_char_tokenizer(CharTokenizer())
    cfg = BuiltModel(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2
    )
    return build_model_for(cfg, tok, seed=0)


def test_bf16_compute_only_on_cuda_when_asked() -> None:
    policy = mixed_precision(torch.device("cuda", 0), "bfloat16")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    for device, dtype in ((torch.device("cpu"), "bfloat16"), (torch.device("cuda"), "float32")):
        policy = mixed_precision(device, dtype)
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None)


def test_each_decoder_layer_is_one_unit(tiny: PreTrainedModel) -> None:
    layers = decoder_layers(tiny)
    assert len(layers) == 3
    assert all(type(layer).__name__ == "Qwen2DecoderLayer" for layer in layers)
    with pytest.raises(TrainError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_sharding_needs_a_mesh(tiny: PreTrainedModel) -> None:
    groups = ProcessGroups(topology=Topology(), device=torch.device("cpu"))
    with pytest.raises(TrainError, match="mesh"):
        shard_model(tiny, groups)


def _driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ranks_driver", DRIVER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_train_in_bf16_and_export_float32(tmp_path: Path) -> None:
    driver = _driver()
    driver.prepare(
        tmp_path,
        driver.recipe(trainer={"device": "cuda", "param_dtype": "bfloat16"}, optim={"lr": 1e-3}),
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(DRIVER), "train", str(tmp_path)]
    run = subprocess.run(
        command, env=dict(os.environ), capture_output=True, text=True, timeout=240, check=False
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "rank0.json").read_text())
    for metrics in result["metrics"]:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["train/optimizer_steps"] == 3.0
    exported = load_file(tmp_path / "out" / "hf" / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.float32}  # the recipe's model dtype
    synced = torch.load(tmp_path / "out" / "sync.pt")
    assert {t.dtype for t in synced.values()} == {torch.float32}
