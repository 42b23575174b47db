"""The reductions a training step needs across ranks; identities at world size 1.

Loss denominators (token or sequence counts) and metric sums are all-reduced here, so the same
step code gives the same update at any world size once ranks exist (each rank holding its own
rows of the batch). Tensors are reduced where they live: CPU tensors over gloo (also on GPU
runs, whose default group is ``cpu:gloo,cuda:nccl``), CUDA tensors over NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Ranks in the default process group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(value: Tensor) -> Tensor:
    """``value`` summed over all ranks (a new tensor; the input is not modified)."""
    total = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_max(value: Tensor) -> Tensor:
    """``value``'s element-wise maximum over all ranks (a new tensor)."""
    top = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return top


def max_over_ranks(count: int) -> int:
    """The largest ``count`` any rank passed (e.g. micro-batches, so ranks run in lockstep)."""
    if world_size() == 1:
        return count
    return int(all_reduce_max(torch.tensor([count], dtype=torch.int64)).item())
