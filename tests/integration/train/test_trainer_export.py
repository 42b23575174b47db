"""HF export, parameters for weight transports, checkpoints, and the worker-thread helper."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nexrl_async.config.model import PretrainedModel
from nexrl_async.config.training import AlgorithmConfig, KLConfig, OptimConfig
from nexrl_async.core.errors import CheckpointError
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.logprobs import batch_logprobs
from nexrl_async.train.model_loading import load_policy
from nexrl_async.train.tensors import sequences_from_batch
from nexrl_async.train.trainer import Trainer


@pytest.fixture
def batch(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> TrainBatch:
    return make_batch(
        [
            make_traj("a", 0, [1, 4, 5], [6, 7, 2], reward=1.0),
            make_traj("a", 1, [1, 4, 5], [8, 9, 10, 2], reward=0.0),
        ]
    )


def test_save_hf_reloads_to_identical_logprobs(
    make_trainer: Callable[..., Trainer], batch: TrainBatch, tmp_path: Path
) -> None:
    trainer = make_trainer()
    trainer.step(batch)
    out = tmp_path / "weights" / "v1"
    assert trainer.save_hf(out) == out
    model, tokenizer = load_policy(PretrainedModel(path=str(out)), None, seed=123)
    seq = sequences_from_batch(batch, pad_token_id=trainer.pad_token_id)
    mine, _ = batch_logprobs(trainer.model, seq, token_budget=100, temperature=1.0)
    theirs, _ = batch_logprobs(model, seq, token_budget=100, temperature=1.0)
    assert torch.equal(mine, theirs)
    assert tokenizer.encode("12") == trainer.tokenizer.encode("12")


def test_save_hf_replaces_an_existing_folder_and_leaves_no_temporaries(
    make_trainer: Callable[..., Trainer], batch: TrainBatch, tmp_path: Path
) -> None:
    trainer = make_trainer()
    out = tmp_path / "latest"
    trainer.save_hf(out)
    (out / "stale.txt").write_text("from the previous export")
    trainer.step(batch)
    trainer.save_hf(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    assert not (out / "stale.txt").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(saved, trainer.model.get_input_embeddings().weight.detach())


def test_parameters_for_sync_match_the_exported_checkpoint(
    make_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    trainer = make_trainer()
    trainer.save_hf(tmp_path / "hf")
    synced = dict(trainer.named_parameters_for_sync())
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(synced)
        for name, tensor in synced.items():
            assert not tensor.requires_grad
            assert torch.equal(f.get_tensor(name), tensor), name


def test_checkpoint_round_trip_resumes_the_exact_trajectory(
    make_trainer: Callable[..., Trainer], batch: TrainBatch, tmp_path: Path
) -> None:
    def build() -> Trainer:
        kl = KLConfig(placement="loss", controller="adaptive", coef=0.2, target=1.0, horizon=4)
        return make_trainer(
            algorithm=AlgorithmConfig(kl=kl),
            optim=OptimConfig(lr=1e-2, schedule="linear", warmup_steps=1),
            total_steps=6,
        )

    original = build()
    original.step(batch)
    original.step(batch)
    original.save_checkpoint(tmp_path / "ckpt")
    resumed = build()
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.steps_done == 2
    a, b = original.step(batch), resumed.step(batch)
    for key in ("train/loss", "train/lr", "train/kl_coef", "train/grad_norm", "train/kl"):
        assert a[key] == b[key], key
    for (name, p), q in zip(
        original.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name


def test_load_checkpoint_errors_are_checkpoint_errors(
    make_trainer: Callable[..., Trainer], batch: TrainBatch, tmp_path: Path
) -> None:
    trainer = make_trainer()
    with pytest.raises(CheckpointError, match="holds no trainer checkpoint"):
        trainer.load_checkpoint(tmp_path / "nowhere")
    trainer.step(batch)
    trainer.save_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "trainer_extra.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot load"):
        make_trainer().load_checkpoint(tmp_path / "ckpt")
