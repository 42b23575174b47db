"""LoRA through peft on a tiny built model: what trains, what is exported, synced, checkpointed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tiny_train import TINY
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM, PreTrainedModel

from nexrl_async.config.model import CharTokenizer, LoraConfig
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.core.errors import CheckpointError, ConfigError
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.checkpoint import MODEL_DIR
from nexrl_async.train.logprobs import batch_logprobs
from nexrl_async.train.lora import ADAPTER_DIR
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.tensors import sequences_from_batch
from nexrl_async.train.trainer import Trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    # PeftModel.from_pretrained reads transformers' deprecated is_gradient_checkpointing
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]

LORA = LoraConfig(rank=4, alpha=8.0)


def build(lora: LoraConfig | None = LORA, *, seed: int = 0) -> Trainer:
    spec = TrainerSpec(
        model=msgspec.structs.replace(TINY, lora=lora),
        tokenizer=CharTokenizer(),
        algorithm=AlgorithmConfig(),
        optim=OptimConfig(lr=1e-2, max_grad_norm=None),
        trainer=TrainerConfig(micro_batch_tokens=16, threads=1),
        seed=seed,
        max_new_tokens=8,
    )
    return Trainer.from_spec(spec)


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


def logprobs(model: torch.nn.Module, trainer: Trainer, batch: TrainBatch) -> torch.Tensor:
    seq = sequences_from_batch(batch, pad_token_id=trainer.pad_token_id)
    values, _ = batch_logprobs(model, seq, token_budget=100, temperature=1.0)
    return values


def adapter_count(plain: PreTrainedModel, rank: int) -> int:
    """``rank · (in + out)`` for every linear layer but the LM head."""
    head = plain.get_output_embeddings()
    return sum(
        rank * (m.in_features + m.out_features)
        for m in plain.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )


def test_only_adapters_train_and_the_footprint_is_reported(
    batch: TrainBatch, tiny_model: PreTrainedModel
) -> None:
    trainer = build()
    adapters = {n for n, _ in trainer.model.named_parameters() if ".lora_" in n}
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in trainer.model.named_parameters() if n in adapters}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.step(batch)  # B = 0 at first: only B moves; A follows from the second step
    metrics = trainer.step(batch)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]) == (name not in adapters), name

    expected = adapter_count(tiny_model, LORA.rank)
    total = sum(p.numel() for p in tiny_model.parameters())
    assert metrics["train/params_trainable"] == expected
    assert metrics["train/params_model"] == total
    assert metrics["train/params_trainable_frac"] == pytest.approx(expected / total)
    # AdamW: two float32 moments per trainable value, plus a step count per tensor
    state_bytes = 2 * 4 * expected + 4 * len(adapters)
    assert metrics["train/optim_state_mb"] == pytest.approx(state_bytes / 2**20)
    full = build(None).step(batch)
    assert full["train/params_trainable"] == full["train/params_model"] == total
    full_bytes = 2 * 4 * total + 4 * len(list(tiny_model.parameters()))
    assert full["train/optim_state_mb"] == pytest.approx(full_bytes / 2**20)
    assert full["train/optim_state_mb"] > 4 * metrics["train/optim_state_mb"]


def test_before_training_the_merged_weights_are_the_base_model(
    tiny_model: PreTrainedModel,
) -> None:
    synced = dict(build().named_parameters_for_sync())
    plain = dict(tiny_model.named_parameters())
    assert synced.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(synced[name], tensor), name  # B starts at zero


def test_export_is_the_merged_plain_model_plus_the_adapter_folder(
    batch: TrainBatch, tiny_model: PreTrainedModel, tmp_path: Path
) -> None:
    trainer = build()
    trainer.step(batch)
    trainer.step(batch)
    out = trainer.save_hf(tmp_path / "final")
    mine = logprobs(trainer.model, trainer, batch)

    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not isinstance(plain, PeftModel)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logprobs(plain, trainer, batch), mine, atol=1e-5, rtol=0)
    moved = logprobs(tiny_model, trainer, batch)
    assert float((moved - mine).abs().max()) > 1e-3, "degenerate: the adapters did not move"

    assert (out / ADAPTER_DIR / "adapter_config.json").is_file()
    assert not list(out.glob("adapter_*"))  # servers read the top folder's safetensors only
    with_adapter = PeftModel.from_pretrained(tiny_model, out / ADAPTER_DIR)
    torch.testing.assert_close(logprobs(with_adapter, trainer, batch), mine, atol=1e-6, rtol=0)

    synced = dict(trainer.named_parameters_for_sync())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(synced)
        for name, tensor in synced.items():
            assert torch.equal(f.get_tensor(name), tensor), name


def test_checkpoint_holds_the_adapters_and_resumes_exactly(
    batch: TrainBatch, tmp_path: Path
) -> None:
    uninterrupted = build()
    expected = [uninterrupted.step(batch)["train/loss"] for _ in range(3)]

    first = build()
    losses = [first.step(batch)["train/loss"] for _ in range(2)]
    first.save_checkpoint(tmp_path / "ckpt")
    saved = FileSystemReader(tmp_path / "ckpt" / MODEL_DIR).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    adapters = {n for n, p in first.model.named_parameters() if p.requires_grad}
    assert model_keys == adapters
    assert all(".lora_A." in k or ".lora_B." in k for k in model_keys)

    resumed = build()
    with torch.no_grad():  # whatever the adapters hold now, the checkpoint's must come back
        for name, param in resumed.model.named_parameters():
            if name in adapters:
                param.normal_()
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.steps_done == 2
    losses.append(resumed.step(batch)["train/loss"])
    assert losses == expected
    finished = dict(uninterrupted.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, finished[name]), name

    with pytest.raises(CheckpointError):
        build(None).load_checkpoint(tmp_path / "ckpt")  # full fine-tuning: no base weights


@pytest.mark.parametrize(
    ("targets", "problem"),
    [
        (["embed_tokens"], "only linear layers"),
        (["lm_head"], "tied"),
        (["no_such_layer"], "no_such_layer"),
    ],
)
def test_bad_targets_are_config_errors(targets: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        build(LoraConfig(target_modules=targets))
    assert info.value.path == "model.lora.target_modules"


def test_adapter_initialisation_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a, b = build(), build()
    assert torch.equal(torch.rand(3), expected)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    other = dict(build(seed=1).model.named_parameters())
    name = next(n for n in other if ".lora_A." in n)
    assert not torch.equal(other[name], dict(a.model.named_parameters())[name])
