"""A :class:`TrainBatch` as right-padded ``[B, T]`` tensors, one row per trajectory.

Alignment (the one convention every per-token tensor in ``train/`` follows): column ``t`` of a
per-token tensor describes token ``input_ids[b, t]``. ``loss_mask[b, t] = 1`` trains token ``t``;
its log-prob ``log p(x_t | x_<t)`` comes from the logits at position ``t - 1``, so column 0 has
no log-prob and is never trained (a loss-mask 1 on a sequence's first token is dropped).

Rows keep the batch's trajectory order (group by group). Tensors live on CPU; micro-batches
move the rows they need to the training device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nexrl_async.core.errors import TrainError
from nexrl_async.core.records import TrainBatch, Trajectory


@dataclass(frozen=True)
class SequenceBatch:
    """Per-trajectory token sequences of one batch (all turns concatenated), on CPU."""

    input_ids: Tensor
    """``[B, T]`` int64, right-padded with the pad id."""
    attention_mask: Tensor
    """``[B, T]`` int64: 1 on real tokens, 0 on padding."""
    loss_mask: Tensor
    """``[B, T]`` float32 0/1: the token is trained (column 0 always 0)."""
    rollout_logprobs: Tensor
    """``[B, T]`` float32: the server's log-prob of the token; 0 where ``rollout_mask`` is 0."""
    rollout_mask: Tensor
    """``[B, T]`` bool: a loss token for which the server reported a log-prob."""
    lengths: Tensor
    """``[B]`` int64: real tokens per row."""
    rewards: Tensor
    """``[B]`` float32: the evaluator's reward."""
    group_index: Tensor
    """``[B]`` int64: dense group id (``0..G-1`` in order of first appearance)."""
    response_lengths: Tensor
    """``[B]`` int64: tokens of the longest assistant turn (what ``max_new_tokens`` limits)."""

    @property
    def size(self) -> int:
        """``B``: rows (trajectories)."""
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        """``T``: padded length."""
        return int(self.input_ids.shape[1])


def sequences_from_batch(batch: TrainBatch, *, pad_token_id: int) -> SequenceBatch:
    """Concatenate each trajectory's turns into one row; see the module docstring.

    Raises:
        TrainError: the batch is empty, or holds a FAILED or token-less trajectory.
    """
    trajectories = batch.trajectories
    if not trajectories:
        raise TrainError(f"step {batch.step}: the batch holds no trajectories")
    for traj in trajectories:
        _check(traj, batch.step)
    width = max(traj.num_tokens for traj in trajectories)
    size = len(trajectories)
    input_ids = torch.full((size, width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((size, width), dtype=torch.int64)
    loss_mask = torch.zeros((size, width), dtype=torch.float32)
    rollout_logprobs = torch.zeros((size, width), dtype=torch.float32)
    rollout_known = torch.zeros((size, width), dtype=torch.bool)
    for row, traj in enumerate(trajectories):
        n = traj.num_tokens
        input_ids[row, :n] = torch.tensor(traj.token_ids, dtype=torch.int64)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(traj.loss_mask, dtype=torch.float32).clamp(0, 1)
        logprobs, known = _rollout_logprobs(traj)
        rollout_logprobs[row, :n] = logprobs
        rollout_known[row, :n] = known
    loss_mask[:, 0] = 0.0
    rollout_mask = rollout_known & (loss_mask != 0) & torch.isfinite(rollout_logprobs)
    groups: dict[str, int] = {}
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        rollout_logprobs=torch.where(rollout_mask, rollout_logprobs, 0.0),
        rollout_mask=rollout_mask,
        lengths=attention_mask.sum(dim=-1),
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
        group_index=torch.tensor(
            [groups.setdefault(t.group_id, len(groups)) for t in trajectories], dtype=torch.int64
        ),
        response_lengths=torch.tensor(
            [_response_length(t) for t in trajectories], dtype=torch.int64
        ),
    )


def _check(traj: Trajectory, step: int) -> None:
    if not traj.ok:
        raise TrainError(
            f"step {step}: trajectory {traj.group_id}/{traj.sample_index} is FAILED "
            f"({traj.failure}); the pool must filter failed samples"
        )
    if traj.num_tokens == 0:
        raise TrainError(f"step {step}: trajectory {traj.group_id}/{traj.sample_index} is empty")


def _rollout_logprobs(traj: Trajectory) -> tuple[Tensor, Tensor]:
    """``[n]`` server log-probs of the trajectory's tokens and ``[n]`` bool: reported or not."""
    values: list[float] = []
    known: list[bool] = []
    for turn in traj.turns:
        if turn.logprobs is None:
            values.extend([0.0] * len(turn.token_ids))
            known.extend([False] * len(turn.token_ids))
        else:
            values.extend(turn.logprobs)
            known.extend([True] * len(turn.token_ids))
    return torch.tensor(values, dtype=torch.float32), torch.tensor(known, dtype=torch.bool)


def _response_length(traj: Trajectory) -> int:
    return max((len(t.token_ids) for t in traj.turns if t.role == "assistant"), default=0)
