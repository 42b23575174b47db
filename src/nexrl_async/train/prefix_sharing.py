"""Prefix sharing: a prompt that several rows of a padded micro-batch share runs once.

The samples of a GRPO group share their prompt, and the padded forward computes it once per
sample. Here a micro-batch whose rows share prefixes runs as two forwards:

1. the **prefixes** ``[g, P]``, one row per distinct prefix (left-padded, so each ends at column
   ``P - 1``), with a KV cache;
2. the **suffixes** ``[b, S]``, each row's tokens after its prefix (right-padded), attending to
   its prefix through that cache (rows of one prefix get copies of its keys and values:
   ``index_select``, whose backward adds the rows' gradients back into the prefix).

The logits of row ``r`` at column ``t`` come from the prefix forward for ``t < p_r`` and from the
suffix forward after it, gathered back into the padded ``[b, W, V]`` layout, so everything
downstream (log-probs, entropies, the loss) is unchanged: it is the padded computation with each
prompt computed once, exact up to float rounding. A prefix is the longest common prefix of the
rows of one group (``group_index``), cut so every row keeps at least one token of its own.

On the CPU demo (32 prompts of 4 tokens, 8 samples of 3 tokens each) it computes 896 token
positions instead of 1,792; the saving grows with the prompt's share of a row. Used where
:func:`plan_shared_prefix` finds it saves at least :data:`MIN_SAVING` of the token slots, for
models with full attention in every layer (a plain per-layer KV cache) and without activation
checkpointing (transformers turns the cache off there).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

MIN_SAVING = 0.2
"""Share prefixes only when that removes at least this fraction of the padded token slots."""


@dataclass(frozen=True)
class SharedPrefix:
    """A padded micro-batch laid out as shared prefixes and per-row suffixes, on the device."""

    prefix_ids: Tensor
    """``[g, P]`` int64: the distinct prefixes, left-padded."""
    prefix_mask: Tensor
    """``[g, P]`` int64: 1 on real prefix tokens."""
    owner: Tensor
    """``[b]`` int64: the prefix each row continues."""
    suffix_ids: Tensor
    """``[b, S]`` int64: each row's tokens after its prefix, right-padded."""
    suffix_mask: Tensor
    """``[b, P + S]`` int64: the row's prefix columns, then its real suffix tokens."""
    positions: Tensor
    """``[b, S]`` int64: positions of the suffix tokens (``p_r + j``)."""
    gather: Tensor
    """``[b, W]`` int64: where each padded position's logits lie in the prefix logits
    ``[g * P]`` followed by the suffix logits ``[b * S]`` (clamped on padding)."""

    @property
    def slots(self) -> int:
        """Token positions the two forwards compute."""
        return int(self.prefix_ids.numel() + self.suffix_ids.numel())


def prefix_lengths(input_ids: Tensor, lengths: Tensor, groups: Tensor) -> Tensor:
    """``[b]``: each row's shared-prefix length: the longest prefix common to all rows of its
    group (``groups``), at most ``length - 1``; 0 for a row alone in its group."""
    b, width = input_ids.shape
    _, dense = torch.unique(groups, return_inverse=True)
    count = int(dense.max()) + 1
    rows = torch.arange(b)
    leader = torch.full((count,), b, dtype=torch.int64).scatter_reduce(0, dense, rows, "amin")
    first = leader[dense]
    same = input_ids == input_ids[first]
    same &= torch.arange(width)[None, :] < torch.minimum(lengths, lengths[first])[:, None]
    common = torch.minimum(same.long().cumprod(dim=1).sum(dim=1), lengths - 1)
    shared = torch.full((count,), width, dtype=torch.int64)
    shared = shared.scatter_reduce(0, dense, common, reduce="amin")
    sizes = torch.bincount(dense, minlength=count)
    return torch.where(sizes[dense] > 1, shared[dense], 0)


def plan_shared_prefix(
    input_ids: Tensor, lengths: Tensor, groups: Tensor, device: torch.device
) -> SharedPrefix | None:
    """The shared layout of right-padded rows ``[b, W]`` (CPU), or ``None`` where it does not
    pay (:data:`MIN_SAVING`) or some row shares no prefix."""
    b, width = input_ids.shape
    if b < 2:
        return None
    prefix = prefix_lengths(input_ids, lengths, groups)
    if int(prefix.min()) < 1:
        return None
    keys: dict[tuple[int, ...], int] = {}
    rows = input_ids.tolist()
    owner = torch.tensor(
        [
            keys.setdefault(tuple(row[:p]), len(keys))
            for row, p in zip(rows, prefix.tolist(), strict=True)
        ]
    )
    g, p_max = len(keys), int(prefix.max())
    s_max = int((lengths - prefix).max())
    if g * p_max + b * s_max > (1.0 - MIN_SAVING) * b * width:
        return None
    prefix_ids = torch.zeros(g, p_max, dtype=torch.int64)
    prefix_mask = torch.zeros(g, p_max, dtype=torch.int64)
    for ids, k in keys.items():
        if ids:
            prefix_ids[k, p_max - len(ids) :] = torch.tensor(ids)
            prefix_mask[k, p_max - len(ids) :] = 1
    cols = torch.arange(s_max)
    source = (prefix[:, None] + cols[None, :]).clamp(max=width - 1)
    real = cols[None, :] < (lengths - prefix)[:, None]
    suffix_ids = torch.where(real, input_ids.gather(1, source), 0)
    suffix_mask = torch.cat([prefix_mask[owner], real.long()], dim=1)
    t = torch.arange(width)[None, :]
    in_prefix = owner[:, None] * p_max + (p_max - prefix[:, None] + t)
    in_suffix = g * p_max + torch.arange(b)[:, None] * s_max + (t - prefix[:, None])
    last = g * p_max + b * s_max - 1
    gather = torch.where(t < prefix[:, None], in_prefix, in_suffix).clamp(0, last)
    return SharedPrefix(
        prefix_ids=prefix_ids.to(device),
        prefix_mask=prefix_mask.to(device),
        owner=owner.to(device),
        suffix_ids=suffix_ids.to(device),
        suffix_mask=suffix_mask.to(device),
        positions=(prefix[:, None] + cols[None, :]).to(device),
        gather=gather.to(device),
    )


def shares_prefixes(model: PreTrainedModel) -> bool:
    """Whether :func:`shared_prefix_logits` runs ``model`` exactly: full attention in every
    layer (a plain KV cache) and no activation checkpointing."""
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    # sliding windows and linear / state-space layers keep caches this forward does not expect
    other = layer_types != {"full_attention"} or bool(getattr(config, "use_sliding_window", 0))
    # transformers 5 renamed is_gradient_checkpointing (kept as a deprecated alias)
    name = "is_activation_checkpointing"
    if not hasattr(type(model), name):
        name = "is_gradient_checkpointing"
    return not other and not getattr(model, name, False)


def _cache_name(model: PreTrainedModel) -> str:
    """The forward's KV-cache argument: ``cache`` in newer transformers, ``past_key_values``
    before (a PEFT wrapper: its base model's)."""
    get_base = getattr(model, "get_base_model", None)
    base: torch.nn.Module = get_base() if callable(get_base) else model
    return _cache_argument(type(base))


_CACHE_ARGUMENTS: dict[str, str] = {}


def _cache_argument(cls: type[torch.nn.Module]) -> str:
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key not in _CACHE_ARGUMENTS:
        try:
            params = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        _CACHE_ARGUMENTS[key] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARGUMENTS[key]


def _cache_of(output: Any) -> Any:
    cache = output.get("cache")
    return output.get("past_key_values") if cache is None else cache


def shared_prefix_logits(model: PreTrainedModel, shared: SharedPrefix, width: int) -> Tensor:
    """``[b, W, V]`` logits of the micro-batch's padded layout (see the module docstring)."""
    name = _cache_name(model)
    prefix_positions = (shared.prefix_mask.cumsum(dim=1) - 1).clamp(min=0)
    first = model(
        input_ids=shared.prefix_ids,
        attention_mask=shared.prefix_mask,
        position_ids=prefix_positions,
        use_cache=True,
    )
    layers = [
        (keys.index_select(0, shared.owner), values.index_select(0, shared.owner))
        for keys, values, *_ in _cache_of(first)
    ]
    second = model(
        input_ids=shared.suffix_ids,
        attention_mask=shared.suffix_mask,
        position_ids=shared.positions,
        use_cache=True,
        **{name: DynamicCache(ddp_cache_data=layers)},
    )
    vocab = first.logits.shape[-1]
    flat = torch.cat([first.logits.reshape(-1, vocab), second.logits.reshape(-1, vocab)])
    b = shared.owner.shape[0]
    return flat.index_select(0, shared.gather.reshape(-1)).view(b, width, vocab)
