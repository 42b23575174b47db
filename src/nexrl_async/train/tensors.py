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
from typing import Any

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

    Rows are assembled as Python lists and become each ``[B, T]`` tensor in one call.

    Raises:
        TrainError: the batch is empty, or holds a FAILED or token-less trajectory.
    """
    trajectories = batch.trajectories
    if not trajectories:
        raise TrainError(f"step {batch.step}: the batch holds no trajectories")
    rows = [_row(traj, batch.step) for traj in trajectories]
    lengths = [len(row[0]) for row in rows]
    width = max(lengths)

    def padded(column: int, fill: float | bool) -> list[list[Any]]:
        return [row[column] + [fill] * (width - n) for row, n in zip(rows, lengths, strict=True)]

    input_ids = torch.tensor(padded(0, pad_token_id), dtype=torch.int64)
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    loss_mask = torch.tensor(padded(1, 0.0), dtype=torch.float32).clamp_(0, 1)
    loss_mask[:, 0] = 0.0
    rollout_logprobs = torch.tensor(padded(2, 0.0), dtype=torch.float32)
    rollout_mask = torch.tensor(padded(3, False), dtype=torch.bool)
    rollout_mask &= (loss_mask != 0) & torch.isfinite(rollout_logprobs)
    groups: dict[str, int] = {}
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        rollout_logprobs=torch.where(rollout_mask, rollout_logprobs, 0.0),
        rollout_mask=rollout_mask,
        lengths=torch.tensor(lengths, dtype=torch.int64),
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
        group_index=torch.tensor(
            [groups.setdefault(t.group_id, len(groups)) for t in trajectories], dtype=torch.int64
        ),
        response_lengths=torch.tensor(
            [_response_length(t) for t in trajectories], dtype=torch.int64
        ),
    )


def _row(traj: Trajectory, step: int) -> tuple[list[int], list[int], list[float], list[bool]]:
    """A trajectory's token ids, loss mask, server log-probs (0.0 where none) and whether the
    server reported them, over all its turns."""
    _check(traj, step)
    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    known: list[bool] = []
    for turn in traj.turns:
        n = len(turn.token_ids)
        ids += turn.token_ids
        mask += turn.loss_mask
        logprobs += [0.0] * n if turn.logprobs is None else turn.logprobs
        known += [turn.logprobs is not None] * n
    return ids, mask, logprobs, known


def _check(traj: Trajectory, step: int) -> None:
    if not traj.ok:
        raise TrainError(
            f"step {step}: trajectory {traj.group_id}/{traj.sample_index} is FAILED "
            f"({traj.failure}); the pool must filter failed samples"
        )
    if traj.num_tokens == 0:
        raise TrainError(f"step {step}: trajectory {traj.group_id}/{traj.sample_index} is empty")


def _response_length(traj: Trajectory) -> int:
    return max((len(t.token_ids) for t in traj.turns if t.role == "assistant"), default=0)
