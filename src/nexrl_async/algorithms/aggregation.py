"""Reduce a per-token loss ``[B, T]`` to a scalar, with shard-exact global denominators.

Every mode is written as ``numerator / denominator`` where the numerator is a plain sum over the
rows of the batch. A batch split into shards (ranks, micro-batches) therefore reproduces the
full-batch value exactly when each shard is reduced with the *global* denominator and the
results are summed::

    sum_s aggregate(v_s, m_s, mode, denominator=D_global) == aggregate(v, m, mode)

where ``D_global = sum_s aggregation_denominator(m_s, mode)`` (an all-reduce sum on ranks).

A mask entry counts when it is non-zero; masks are 0/1 (bool or numeric), not weights. Masked
positions never reach the result, so padding may hold any finite or non-finite value. A row whose
mask is all zero is an *empty sequence*: it adds nothing and is not counted by the ``seq-*``
modes. An all-zero mask gives 0, never NaN.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

AggMode = Literal[
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]
AGG_MODES: tuple[str, ...] = get_args(AggMode)


def _check(values: Tensor, mask: Tensor, mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(
            f"values and mask must both be [B, T]; got {tuple(values.shape)} and "
            f"{tuple(mask.shape)}"
        )


def aggregation_denominator(mask: Tensor, mode: AggMode) -> Tensor:
    """The count that ``aggregate`` divides by when ``denominator`` is not given.

    - ``token-mean``: ``N_tok = sum(m != 0)`` (masked tokens);
    - ``seq-*`` modes: ``N_seq = #{b : sum_t m[b, t] != 0}`` (non-empty sequences).

    Sum this over shards (``all_reduce(SUM)`` across ranks and micro-batches) to get the global
    ``denominator`` to pass back to :func:`aggregate`.

    Args:
        mask: ``[B, T]`` 0/1 mask (bool or numeric).
        mode: one of the four aggregation modes.

    Returns:
        A float32 0-dim tensor on ``mask.device``.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T]; got {tuple(mask.shape)}")
    keep = mask != 0
    if mode == "token-mean":
        return keep.sum().to(torch.float32)
    return keep.any(dim=-1).sum().to(torch.float32)


def _safe(count: Tensor) -> Tensor:
    """Replace a zero count by one: the matching numerator is zero, so the quotient is 0."""
    return torch.where(count > 0, count, torch.ones_like(count))


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: AggMode,
    *,
    denominator: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> Tensor:
    """Aggregate a per-token quantity ``values [B, T]`` over ``mask [B, T]`` into a scalar.

    With ``m`` the 0/1 mask, ``n_b = sum_t m[b, t]``, ``N_tok = sum_b n_b`` and ``N_seq`` the
    number of rows with ``n_b > 0`` (see :func:`aggregation_denominator`):

    - ``token-mean``:              ``sum_{b,t} v·m / D``,                     ``D = N_tok``
    - ``seq-mean-token-sum``:      ``sum_b (sum_t v·m) / D``,                 ``D = N_seq``
    - ``seq-mean-token-mean``:     ``sum_b (sum_t v·m / n_b) / D``,           ``D = N_seq``
    - ``seq-mean-token-sum-norm``: ``sum_{b,t} v·m / (D · C)``,  ``D = N_seq``,
      ``C = norm_constant`` (default ``T = mask.shape[-1]``): Dr. GRPO's constant normaliser.

    Empty rows (``n_b = 0``) contribute 0 (``seq-mean-token-mean`` takes their mean as 0).
    ``denominator`` replaces ``D`` (not ``C``) so that shards reduced with the global ``D`` sum
    to the full-batch value. With sharding, pass ``norm_constant`` explicitly (e.g. the maximum
    response length): the default ``T`` is each shard's own padded width. A zero ``D`` gives 0.

    Args:
        values: ``[B, T]`` per-token values (e.g. per-token loss); gradients flow through them.
        mask: ``[B, T]`` 0/1 mask (bool or numeric); non-zero entries count.
        mode: aggregation mode, see above.
        denominator: overrides ``D``; a Python number (checked ``>= 0``) or a 0-dim tensor (not
            checked, to avoid a device sync), e.g. the all-reduced :func:`aggregation_denominator`.
        norm_constant: ``C`` for ``seq-mean-token-sum-norm``, must be ``> 0``; ignored otherwise.

    Returns:
        A 0-dim tensor with ``values``' dtype.
    """
    _check(values, mask, mode)
    keep = mask != 0
    masked = torch.where(keep, values, torch.zeros_like(values))
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / _safe(keep.sum(dim=-1).to(values.dtype))
        numerator = per_seq.sum()
    else:
        numerator = masked.sum()

    if denominator is None:
        count = aggregation_denominator(mask, mode).to(values.dtype)
    else:
        if not isinstance(denominator, Tensor) and not denominator >= 0:
            raise ValueError(f"denominator must be >= 0; got {denominator}")
        count = torch.as_tensor(denominator, dtype=values.dtype, device=values.device)
        if count.dim() != 0:
            raise ValueError(f"denominator must be a scalar; got shape {tuple(count.shape)}")

    if mode == "seq-mean-token-sum-norm":
        constant = float(max(mask.shape[-1], 1)) if norm_constant is None else norm_constant
        if not constant > 0:
            raise ValueError(f"norm_constant must be > 0; got {norm_constant}")
        count = count * constant
    return numerator / _safe(count)
