"""A :class:`TrainBatch` as right-padded ``[B, T]`` tensors, one row per trajectory.

Alignment (the one convention every per-token tensor in ``train/`` follows): column ``t`` of a
per-token tensor describes token ``input_ids[b, t]``. ``loss_mask[b, t] = 1`` trains token ``t``;
its log-prob ``log p(x_t | x_<t)`` comes from the logits at position ``t - 1``, so column 0 has
no log-prob and is never trained (a loss-mask 1 on a sequence's first token is dropped).

Rows keep the batch's trajectory order (group by group). Tensors live on CPU; micro-batches
move the rows they need to the training device.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
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
    """``[B]`` int64: dense advantage-group id (``0..G-1`` in order of first appearance): the
    group's ``baseline_key`` when it has one, else the group itself."""
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


@dataclass
class _Flat:
    """Every trajectory's tokens concatenated (no padding), in C arrays."""

    ids: array[int] = field(default_factory=lambda: array("q"))
    loss: array[float] = field(default_factory=lambda: array("d"))
    logprobs: array[float] = field(default_factory=lambda: array("d"))
    known: array[int] = field(default_factory=lambda: array("b"))
    lengths: list[int] = field(default_factory=list)

    def add(self, traj: Trajectory) -> None:
        start = len(self.ids)
        for turn in traj.turns:
            n = len(turn.token_ids)
            self.ids.extend(turn.token_ids)
            self.loss.extend(turn.loss_mask)
            self.logprobs.extend([0.0] * n if turn.logprobs is None else turn.logprobs)
            self.known.extend([turn.logprobs is not None] * n)
        self.lengths.append(len(self.ids) - start)

    def spread(self, values: array[Any], dtype: torch.dtype, real: Tensor, fill: float) -> Tensor:
        """``[B, T]`` of ``dtype``: ``values`` row after row where ``real``, else ``fill``."""
        flat = torch.frombuffer(values, dtype=_BUFFER_DTYPES[values.typecode]).to(dtype)
        out = torch.full(real.shape, fill, dtype=dtype)
        out[real] = flat
        return out


_BUFFER_DTYPES = {"q": torch.int64, "d": torch.float64, "b": torch.int8}


def sequences_from_batch(batch: TrainBatch, *, pad_token_id: int) -> SequenceBatch:
    """Concatenate each trajectory's turns into one row; see the module docstring.

    The tokens of all rows are gathered in flat C arrays, then spread into each ``[B, T]``
    tensor at once (a Python loop per token would cost more than the training forward on
    short rows).

    Raises:
        TrainError: the batch is empty, or holds a FAILED or token-less trajectory.
    """
    trajectories = batch.trajectories
    if not trajectories:
        raise TrainError(f"step {batch.step}: the batch holds no trajectories")
    flat = _Flat()
    for traj in trajectories:
        _check(traj, batch.step)
        flat.add(traj)
    lengths = torch.tensor(flat.lengths, dtype=torch.int64)
    real = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    loss_mask = flat.spread(flat.loss, torch.float32, real, 0.0).clamp_(0, 1)
    loss_mask[:, 0] = 0.0
    rollout_logprobs = flat.spread(flat.logprobs, torch.float32, real, 0.0)
    rollout_mask = flat.spread(flat.known, torch.int8, real, 0) != 0
    rollout_mask &= (loss_mask != 0) & torch.isfinite(rollout_logprobs)
    return SequenceBatch(
        input_ids=flat.spread(flat.ids, torch.int64, real, pad_token_id),
        attention_mask=real.long(),
        loss_mask=loss_mask,
        rollout_logprobs=torch.where(rollout_mask, rollout_logprobs, 0.0),
        rollout_mask=rollout_mask,
        lengths=lengths,
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32),
        group_index=_group_index(batch),
        response_lengths=torch.tensor(
            [_response_length(t) for t in trajectories], dtype=torch.int64
        ),
    )


def _group_index(batch: TrainBatch) -> Tensor:
    """``[B]`` dense advantage-group ids: a group's ``baseline_key`` if it has one (groups
    sharing it share one baseline, ``pool.group_by``), else its own id."""
    dense: dict[tuple[bool, str], int] = {}
    index = [
        dense.setdefault(
            (True, g.baseline_key) if g.baseline_key is not None else (False, g.group_id),
            len(dense),
        )
        for g in batch.groups
        for _ in g.trajectories
    ]
    return torch.tensor(index, dtype=torch.int64)


def _check(traj: Trajectory, step: int) -> None:
    if not traj.ok:
        raise TrainError(
            f"step {step}: trajectory {traj.group_id}/{traj.sample_index} is FAILED "
            f"({traj.failure}); the pool must filter failed samples"
        )
    if not any(turn.token_ids for turn in traj.turns):
        raise TrainError(f"step {step}: trajectory {traj.group_id}/{traj.sample_index} is empty")


def _response_length(traj: Trajectory) -> int:
    return max((len(t.token_ids) for t in traj.turns if t.role == "assistant"), default=0)
