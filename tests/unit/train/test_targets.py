from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nexrl_async.algorithms import group_advantages
from nexrl_async.config.training import AlgorithmConfig, KLConfig, OverlongConfig, TISConfig
from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import TrainBatch, Trajectory
from nexrl_async.train.hook import PrepareBatchHook
from nexrl_async.train.targets import PrePass, build_targets, kl_reward_advantages
from nexrl_async.train.tensors import SequenceBatch, sequences_from_batch


@pytest.fixture
def seq(
    make_traj: Callable[..., Trajectory], make_batch: Callable[..., TrainBatch]
) -> SequenceBatch:
    """Two groups of two; every response token has a server log-prob of -1."""
    return sequences_from_batch(
        make_batch(
            [
                make_traj("a", 0, [1, 4], [5, 6, 2], reward=1.0, logprobs=[-1.0] * 3),
                make_traj("a", 1, [1, 4], [7, 2], reward=0.0, logprobs=[-1.0] * 2),
            ],
            [
                make_traj("b", 0, [1, 8], [9, 2], reward=0.5, logprobs=[-1.0] * 2),
                make_traj("b", 1, [1, 8], [4, 4, 2], reward=0.5, logprobs=[-1.0] * 3),
            ],
        ),
        pad_token_id=0,
    )


def _prepass(seq: SequenceBatch, *, shift: float = 0.0, ref: float | None = None) -> PrePass:
    trainer = torch.where(seq.loss_mask != 0, -1.0 + shift, 0.0)
    ref_lp = None if ref is None else torch.where(seq.loss_mask != 0, ref, 0.0)
    return PrePass(
        trainer_logprobs=trainer, entropy=torch.full_like(trainer, 2.0), ref_logprobs=ref_lp
    )


def _build(
    seq: SequenceBatch,
    prepass: PrePass,
    algo: AlgorithmConfig,
    *,
    kl_coef: float = 0.0,
    hook: PrepareBatchHook | None = None,
) -> tuple:
    return build_targets(seq, prepass, algo, step=7, kl_coef=kl_coef, max_new_tokens=4, hook=hook)


def test_kl_in_reward_is_the_masked_reward_to_go() -> None:
    adv = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.0, 0.1, 0.2, 0.3], [0.0, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    out = kl_reward_advantages(adv, kl, mask, 0.5)
    expected = torch.tensor([[0.7, 0.7, 0.75, 0.85], [-1.5, -1.5, -1.25, -1.0]])
    torch.testing.assert_close(out, expected)


def test_default_targets_are_group_advantages_on_every_token(seq: SequenceBatch) -> None:
    prepass = _prepass(seq, shift=0.25)
    targets, metrics = _build(seq, prepass, AlgorithmConfig())
    expected = group_advantages(seq.rewards, seq.group_index)
    assert expected.tolist()[2:] == [0.0, 0.0]
    torch.testing.assert_close(targets.advantages[:, 3], expected)
    assert targets.old_logprobs is prepass.trainer_logprobs
    assert targets.ref_logprobs is None
    assert metrics["train/logprob_mismatch"] == pytest.approx(0.25)
    assert metrics["train/entropy"] == pytest.approx(2.0)
    assert metrics["train/response_len_mean"] == pytest.approx(2.5)
    assert metrics["train/zero_variance_frac"] == pytest.approx(0.5)
    assert metrics["train/loss_tokens"] == 10.0
    assert "train/kl" not in metrics


def test_server_old_logprobs_are_used_and_required(seq: SequenceBatch) -> None:
    algo = AlgorithmConfig(old_logprobs="server")
    targets, _ = _build(seq, _prepass(seq, shift=0.3), algo)
    assert targets.old_logprobs is seq.rollout_logprobs
    holes = SequenceBatch(**{**seq.__dict__, "rollout_mask": torch.zeros_like(seq.rollout_mask)})
    with pytest.raises(TrainError, match="server's log-prob"):
        _build(holes, _prepass(seq), algo)


def test_overlong_penalty_shapes_the_reward(seq: SequenceBatch) -> None:
    algo = AlgorithmConfig(overlong=OverlongConfig(enabled=True, buffer_len=2, factor=1.0))
    _, metrics = _build(seq, _prepass(seq), algo)
    # response lengths 3, 2, 2, 3 with max_new_tokens 4, buffer 2: penalties -0.5, 0, 0, -0.5
    assert metrics["train/reward_mean"] == pytest.approx((0.5 + 0.0 + 0.5 + 0.0) / 4)


def test_kl_in_reward_changes_advantages_and_is_reported(seq: SequenceBatch) -> None:
    algo = AlgorithmConfig(kl=KLConfig(placement="reward", kind="k1"))
    prepass = _prepass(seq, ref=-1.5)  # k1 = 0.5 on every loss token
    targets, metrics = _build(seq, prepass, algo, kl_coef=0.1)
    base = group_advantages(seq.rewards, seq.group_index)
    # row 0 has loss tokens at 2, 3, 4: reward-to-go of 0.5 per token
    torch.testing.assert_close(
        targets.advantages[0, 2:5], base[0] - 0.1 * torch.tensor([1.5, 1.0, 0.5])
    )
    assert metrics["train/kl"] == pytest.approx(0.5)
    loss_only = AlgorithmConfig(kl=KLConfig(placement="loss", kind="k1"))
    targets_loss, _ = _build(seq, prepass, loss_only, kl_coef=0.1)
    torch.testing.assert_close(targets_loss.advantages[0, 2:5], base[0].expand(3))
    assert targets_loss.ref_logprobs is prepass.ref_logprobs


def test_tis_weights_multiply_the_advantages(seq: SequenceBatch) -> None:
    algo = AlgorithmConfig(tis=TISConfig(enabled=True, cap=2.0))
    targets_plain, _ = _build(seq, _prepass(seq, shift=math.log(3.0)), AlgorithmConfig())
    targets, metrics = _build(seq, _prepass(seq, shift=math.log(3.0)), algo)
    # w = exp(log 3) = 3, truncated to the cap 2
    mask = seq.loss_mask != 0
    torch.testing.assert_close(targets.advantages[mask], 2.0 * targets_plain.advantages[mask])
    assert metrics["train/tis_weight_mean"] == pytest.approx(2.0)
    masked = AlgorithmConfig(tis=TISConfig(enabled=True, cap=2.0, mode="mask"))
    targets_mis, _ = _build(seq, _prepass(seq, shift=math.log(3.0)), masked)
    assert bool((targets_mis.advantages[mask] == 0).all())


def _hook(tmp_path: Path, body: str) -> PrepareBatchHook:
    (tmp_path / "algo.py").write_text("import torch\n\ndef prepare_batch(batch):\n" + body)
    return PrepareBatchHook.load("algo.py:prepare_batch", tmp_path)


def test_hook_sees_the_documented_tensors_and_replaces_advantages(
    seq: SequenceBatch, tmp_path: Path
) -> None:
    hook = _hook(
        tmp_path,
        "    keys = sorted(batch)\n"
        "    assert keys == sorted(['input_ids', 'attention_mask', 'loss_mask', 'rewards',\n"
        "        'raw_rewards', 'group_ids', 'response_lengths', 'trainer_logprobs',\n"
        "        'rollout_logprobs', 'rollout_mask', 'old_logprobs', 'advantages', 'step',\n"
        "        'ref_logprobs']), keys\n"
        "    assert int(batch['step']) == 7\n"
        "    batch['input_ids'].zero_()\n"
        "    return {'advantages': torch.arange(4.0), 'metrics': {'seen': float(len(keys))}}\n",
    )
    algo = AlgorithmConfig(kl=KLConfig(placement="loss"))
    targets, metrics = _build(seq, _prepass(seq, ref=-1.0), algo, hook=hook)
    assert targets.advantages[:, 3].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert metrics["train/user/seen"] == 14.0
    assert int(seq.input_ids.sum()) > 0  # the hook got copies


def test_hook_rewards_are_turned_into_advantages_and_mask_is_replaced(
    seq: SequenceBatch, tmp_path: Path
) -> None:
    hook = _hook(
        tmp_path,
        "    mask = batch['loss_mask'].clone()\n"
        "    mask[:, -1] = 0\n"
        "    return {'rewards': torch.tensor([0.0, 1.0, 0.0, 1.0]), 'loss_mask': mask}\n",
    )
    targets, _ = _build(seq, _prepass(seq), AlgorithmConfig(), hook=hook)
    expected = group_advantages(torch.tensor([0.0, 1.0, 0.0, 1.0]), seq.group_index)
    torch.testing.assert_close(targets.advantages[:, 3], expected)
    assert targets.loss_mask[:, -1].tolist() == [0.0] * 4
