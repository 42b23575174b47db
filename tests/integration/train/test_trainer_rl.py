"""RL steps of the trainer on a tiny built model: the update goes where the algorithm says."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nexrl_async.config.training import (
    AlgorithmConfig,
    KLConfig,
    OptimConfig,
    TISConfig,
)
from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.logprobs import batch_logprobs
from nexrl_async.train.tensors import sequences_from_batch
from nexrl_async.train.trainer import Trainer

PROMPT = [1, 4, 5]


def _response_logprob(trainer: Trainer, batch: TrainBatch) -> torch.Tensor:
    """``[B]`` summed log-probs of each row's loss tokens under the trainer's weights."""
    seq = sequences_from_batch(batch, pad_token_id=trainer.pad_token_id)
    logprobs, _ = batch_logprobs(trainer.model, seq, token_budget=1000, temperature=1.0)
    return (logprobs * seq.loss_mask).sum(-1)


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _unchanged(trainer: Trainer, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


@pytest.fixture
def contrast(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> TrainBatch:
    """One group: a rewarded response and an unrewarded one to the same prompt."""
    return make_batch(
        [
            make_traj("a", 0, PROMPT, [6, 7, 2], reward=1.0),
            make_traj("a", 1, PROMPT, [8, 9, 10, 2], reward=0.0),
        ]
    )


def test_steps_raise_the_logprob_of_positively_advantaged_tokens(
    make_trainer: Callable[..., Trainer], contrast: TrainBatch
) -> None:
    trainer = make_trainer()
    before = _response_logprob(trainer, contrast)
    for _ in range(4):
        metrics = trainer.step(contrast)
    after = _response_logprob(trainer, contrast)
    assert after[0] > before[0] + 0.5
    assert after[1] < before[1] - 0.5
    assert trainer.steps_done == 4
    assert metrics["train/grad_norm"] > 0
    assert metrics["train/optimizer_steps"] == 1.0
    assert metrics["train/tokens"] == 13.0


def test_metrics_carry_the_documented_keys(
    make_trainer: Callable[..., Trainer], contrast: TrainBatch
) -> None:
    trainer = make_trainer(algorithm=AlgorithmConfig(kl=KLConfig(placement="loss")))
    metrics = trainer.step(contrast)
    expected = {
        "train/loss", "train/pg_loss", "train/kl_loss", "train/grad_norm", "train/lr",
        "train/entropy", "train/clip_frac_high", "train/clip_frac_low", "train/approx_kl",
        "train/kl", "train/kl_coef", "train/advantage_mean", "train/advantage_std",
        "train/response_len_mean", "train/tokens", "train/step_s",
    }  # fmt: skip
    assert expected <= metrics.keys()
    assert all(isinstance(v, float) for v in metrics.values())
    assert "train/logprob_mismatch" not in metrics  # no server log-probs in this batch


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_mismatch_is_zero_when_the_server_logprobs_are_the_trainers_own(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
    temperature: float,
) -> None:
    trainer = make_trainer(temperature=temperature)
    responses = [[6, 7, 2], [8, 9, 10, 11, 2], [4]]
    trajs = []
    for i, response in enumerate(responses):
        ids = torch.tensor([PROMPT + response])
        with torch.no_grad():
            logits = trainer.model(input_ids=ids).logits[0] / temperature
        logp = torch.log_softmax(logits, -1)
        served = [float(logp[len(PROMPT) + j - 1, t]) for j, t in enumerate(response)]
        trajs.append(make_traj("a", i, PROMPT, response, reward=float(i), logprobs=served))
    metrics = trainer.step(make_batch(trajs))
    assert metrics["train/logprob_mismatch"] < 1e-5
    wrong = make_trainer(temperature=1.0 if temperature != 1.0 else 0.5)
    assert wrong.step(make_batch(trajs))["train/logprob_mismatch"] > 1e-2


def test_server_old_logprobs_give_ratios_against_the_server(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
) -> None:
    trainer = make_trainer(algorithm=AlgorithmConfig(old_logprobs="server"))
    batch = make_batch(
        [
            make_traj("a", 0, PROMPT, [6, 2], reward=1.0, logprobs=[-0.1, -0.1]),
            make_traj("a", 1, PROMPT, [7, 2], reward=0.0, logprobs=[-0.1, -0.1]),
        ]
    )
    metrics = trainer.step(batch)
    assert metrics["train/approx_kl"] > 0.1  # server says p ≈ 0.9; the tiny model disagrees
    missing = make_batch(
        [make_traj("a", 0, PROMPT, [6, 2], reward=1.0), make_traj("a", 1, PROMPT, [7, 2])]
    )
    with pytest.raises(TrainError, match="server's log-prob"):
        trainer.step(missing)


def test_minibatches_and_epochs_multiply_the_optimizer_steps(
    make_trainer: Callable[..., Trainer], contrast: TrainBatch
) -> None:
    trainer = make_trainer(algorithm=AlgorithmConfig(minibatches=2, epochs=3))
    metrics = trainer.step(contrast)
    assert metrics["train/optimizer_steps"] == 6.0
    assert metrics["train/approx_kl"] > 0  # later epochs see moved weights vs the old ones


def test_failed_trajectory_fails_the_step_cleanly(
    make_trainer: Callable[..., Trainer], make_batch: Callable[..., TrainBatch]
) -> None:
    from nexrl_async.core.records import FailureReason, Status, VersionToken

    failed = Trajectory(
        group_id="a",
        item_key="a",
        sample_index=0,
        token=VersionToken(lease_id=0, version=0),
        status=Status.FAILED,
        failure=FailureReason.GENERATION_ERROR,
    )
    trainer = make_trainer()
    with pytest.raises(TrainError, match="FAILED"):
        trainer.step(make_batch([failed]))
    assert trainer.steps_done == 0


def _single_token_batch(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> TrainBatch:
    """Equal rewards (zero advantage); each row trains one token, so KL-to-go is its own."""
    prompts = [[1, 4, 5], [1, 6], [1, 7, 8, 9], [1, 10, 11]]
    return make_batch([make_traj("a", i, p, [12], reward=1.0) for i, p in enumerate(prompts)])


def _sq_distance(trainer: Trainer, batch: TrainBatch) -> float:
    """``sum (log p - log p_ref)^2`` over the loss tokens."""
    assert trainer.reference is not None
    seq = sequences_from_batch(batch, pad_token_id=trainer.pad_token_id)
    policy, _ = batch_logprobs(trainer.model, seq, token_budget=1000, temperature=1.0)
    ref, _ = batch_logprobs(trainer.reference, seq, token_budget=1000, temperature=1.0)
    return float((((policy - ref) * seq.loss_mask) ** 2).sum())


def _kl_trainer(
    make_trainer: Callable[..., Trainer], placement: str, kind: str, *, scale: float, lr: float
) -> Trainer:
    """A trainer with KL on, whose policy is then moved away from its reference."""
    kl = KLConfig(placement=placement, kind=kind, coef=1.0)  # type: ignore[arg-type]
    trainer = make_trainer(
        algorithm=AlgorithmConfig(kl=kl), optim=OptimConfig(lr=lr, max_grad_norm=None)
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return trainer


@pytest.mark.parametrize(("placement", "kind"), [("loss", "k2"), ("reward", "k1")])
def test_kl_pulls_a_perturbed_policy_back_to_the_reference(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
    placement: str,
    kind: str,
) -> None:
    batch = _single_token_batch(make_traj, make_batch)
    trainer = _kl_trainer(make_trainer, placement, kind, scale=0.3, lr=3e-4)
    start = _sq_distance(trainer, batch)
    for _ in range(3):
        metrics = trainer.step(batch)
    assert _sq_distance(trainer, batch) < 0.7 * start
    assert metrics["train/kl_coef"] == 1.0
    if placement == "reward":
        assert metrics["train/advantage_std"] > 0  # zero outcome advantage, non-zero KL term


def test_k1_in_the_reward_and_k2_as_a_loss_give_the_same_update(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
) -> None:
    """One loss token per row, zero outcome advantage: the reward's ``A_t = -(lp - ref)`` has
    the PPO gradient ``(lp - ref) grad lp / N``, which is the k2 loss's ``grad (lp - ref)^2 / 2N``.
    """
    batch = _single_token_batch(make_traj, make_batch)
    in_reward = _kl_trainer(make_trainer, "reward", "k1", scale=0.3, lr=1e-3)
    as_loss = _kl_trainer(make_trainer, "loss", "k2", scale=0.3, lr=1e-3)
    before = _snapshot(as_loss)
    in_reward.step(batch)
    as_loss.step(batch)
    assert not _unchanged(as_loss, before)
    for (name, a), b in zip(
        in_reward.model.named_parameters(), as_loss.model.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_k3_loss_lowers_the_measured_kl(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
) -> None:
    batch = _single_token_batch(make_traj, make_batch)
    trainer = _kl_trainer(make_trainer, "loss", "k3", scale=0.1, lr=1e-4)
    kls = [trainer.step(batch)["train/kl"] for _ in range(3)]
    assert kls[0] > 0.01
    assert kls[2] < 0.5 * kls[0]


def test_without_kl_a_zero_advantage_batch_changes_nothing(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
) -> None:
    trainer = make_trainer()
    assert trainer.reference is None
    before = _snapshot(trainer)
    trainer.step(_single_token_batch(make_traj, make_batch))
    assert _unchanged(trainer, before)


def test_adaptive_kl_coefficient_moves_towards_the_target(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
) -> None:
    kl = KLConfig(placement="loss", controller="adaptive", coef=0.5, target=5.0, horizon=8)
    trainer = make_trainer(algorithm=AlgorithmConfig(kl=kl))
    batch = _single_token_batch(make_traj, make_batch)
    first = trainer.step(batch)
    second = trainer.step(batch)
    # KL (0 at the start) is far below the target: error -0.2, 4 samples of a horizon of 8.
    assert first["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert second["train/kl_coef"] == pytest.approx(0.5 * (1 - 0.2 * 4 / 8))


def test_tis_mask_mode_drops_tokens_the_server_found_unlikely(
    make_trainer: Callable[..., Trainer],
    make_traj: Callable[..., Trajectory],
    make_batch: Callable[..., TrainBatch],
) -> None:
    batch = make_batch(
        [
            make_traj("a", 0, PROMPT, [6, 2], reward=1.0, logprobs=[-30.0, -30.0]),
            make_traj("a", 1, PROMPT, [7, 2], reward=0.0, logprobs=[-30.0, -30.0]),
        ]
    )
    masked = make_trainer(algorithm=AlgorithmConfig(tis=TISConfig(enabled=True, mode="mask")))
    before = _snapshot(masked)
    metrics = masked.step(batch)
    assert metrics["train/tis_weight_mean"] == 0.0
    assert _unchanged(masked, before)
    truncated = make_trainer(algorithm=AlgorithmConfig(tis=TISConfig(enabled=True, cap=2.0)))
    assert truncated.step(batch)["train/tis_weight_mean"] == pytest.approx(2.0)
    assert not _unchanged(truncated, before)


def test_prepare_batch_hook_decides_the_advantages(
    make_trainer: Callable[..., Trainer], contrast: TrainBatch, tmp_path: Path
) -> None:
    (tmp_path / "algo.py").write_text(
        "import torch\n\n"
        "def prepare_batch(batch):\n"
        "    flipped = -batch['advantages']\n"
        "    return {'advantages': flipped, 'metrics': {'rows': batch['rewards'].numel()}}\n"
    )
    algo = AlgorithmConfig(prepare_batch="algo.py:prepare_batch")
    trainer = make_trainer(algorithm=algo, base_dir=tmp_path)
    before = _response_logprob(trainer, contrast)
    for _ in range(3):
        metrics = trainer.step(contrast)
    after = _response_logprob(trainer, contrast)
    assert metrics["train/user/rows"] == 2.0
    assert after[0] < before[0]  # the hook's sign wins over the reward's
    assert after[1] > before[1]


def test_lr_schedule_is_reported_per_step(
    make_trainer: Callable[..., Trainer], contrast: TrainBatch
) -> None:
    optim = OptimConfig(lr=0.01, schedule="cosine", warmup_steps=2, min_lr_ratio=0.5)
    trainer = make_trainer(optim=optim, total_steps=4)
    lrs = [trainer.step(contrast)["train/lr"] for _ in range(5)]
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.0075, 0.005])


def test_activation_checkpointing_gives_the_same_update(
    make_trainer: Callable[..., Trainer], contrast: TrainBatch
) -> None:
    from nexrl_async.config.training import TrainerConfig

    plain = make_trainer()
    recomputed = make_trainer(
        trainer=TrainerConfig(micro_batch_tokens=16, threads=1, activation_checkpointing=True)
    )
    a, b = plain.step(contrast), recomputed.step(contrast)
    assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-6)
    for p, q in zip(plain.model.parameters(), recomputed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
