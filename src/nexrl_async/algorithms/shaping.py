"""Reward shaping terms added to outcome rewards before advantages are computed."""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(
    lengths: Tensor,
    *,
    max_len: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), a length-dependent reward term.

    With ``L = lengths[b]``, ``L_max = max_len``, ``L_buf = buffer_len``, ``f = penalty_factor``::

        0                                 if L <= L_max - L_buf
        f · ((L_max - L_buf) - L) / L_buf if L_max - L_buf < L <= L_max   (from 0 down to -f)
        -f                                if L > L_max

    ``buffer_len = 0`` gives the hard rule (0 up to ``L_max``, ``-f`` beyond). Add the result to
    the outcome reward.

    Args:
        lengths: ``[B]`` response lengths in tokens.
        max_len: ``L_max > 0``.
        buffer_len: ``0 <= L_buf <= L_max``.
        penalty_factor: ``f >= 0``.

    Returns:
        ``[B]`` float32 penalties in ``[-f, 0]``.
    """
    if not max_len > 0:
        raise ValueError(f"max_len must be > 0; got {max_len}")
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in [0, max_len={max_len}]; got {buffer_len}")
    if not penalty_factor >= 0:
        raise ValueError(f"penalty_factor must be >= 0; got {penalty_factor}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B]; got shape {tuple(lengths.shape)}")
    length = lengths.to(torch.float32)
    start = float(max_len - buffer_len)
    in_buffer = (start - length) / max(buffer_len, 1) * penalty_factor
    penalty = torch.where(length <= start, torch.zeros_like(length), in_buffer)
    return torch.where(length > max_len, torch.full_like(length, -penalty_factor), penalty)
