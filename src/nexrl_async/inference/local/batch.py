"""The running batch: left-padded KV cache shared by every sequence being decoded.

Layout. Row ``i`` of the batch owns ``cache[:, i]``, ``mask[i]`` and ``positions[i]``; the cache
is ``[B, H, T, D]`` per layer with each row's tokens right-aligned (left padding, ``mask == 0``),
``positions[i]`` is the number of real tokens of row ``i`` (the RoPE position of its next token)
and ``last[i]`` is its newest sampled token, which is not in the cache yet.

- ``decode()`` feeds ``last`` as one new column for every row: one forward for the whole batch.
- ``prefill(prompts)`` runs the new prompts (left-padded among themselves) and returns a batch
  of their own, which ``extend`` merges in by left-padding the shorter cache to the longer one.
- ``select(keep)`` drops finished rows and then the leading columns that are padding everywhere.

Runs only on the torch thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass(frozen=True)
class Prefill:
    """A prefilled group of prompts: its batch, last-position logits ``[b, V]`` and, if asked,
    the logits of every prompt position ``[b, L, V]`` (left-padded like the prompts)."""

    batch: DecodeBatch
    last_logits: torch.Tensor
    all_logits: torch.Tensor | None


class DecodeBatch:
    """KV cache + attention mask + positions + newest tokens of the rows being decoded."""

    def __init__(
        self,
        cache: list[tuple[torch.Tensor, torch.Tensor]] | DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        # The DynamicCache object lives across decode steps (it grows in place); it is rebuilt
        # only when rows join or leave.
        self.cache = cache if isinstance(cache, DynamicCache) else _cache(cache)
        self.mask = mask
        self.positions = positions
        self.last = torch.zeros_like(positions)

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each ``[B, H, T, D]``."""
        return [(k, v) for k, v, *_ in self.cache] if self.size else []

    @classmethod
    def empty(cls) -> DecodeBatch:
        return cls([], torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        """Cache columns ``T`` (longest row, padding included)."""
        return int(self.mask.shape[1])

    def decode(self, model: PreTrainedModel) -> torch.Tensor:
        """One forward step of every row on its ``last`` token; returns logits ``[B, V]``."""
        ones = torch.ones(self.size, 1, dtype=self.mask.dtype, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        out = model(
            input_ids=self.last[:, None],
            attention_mask=mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.mask = mask
        self.positions = self.positions + 1
        return out.logits[:, -1]

    @staticmethod
    def prefill(model: PreTrainedModel, prompts: list[list[int]], *, all_logits: bool) -> Prefill:
        """Run ``prompts`` (left-padded) through the model; the result's ``last`` is unset."""
        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=DynamicCache(),
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        batch = DecodeBatch(out.past_key_values, mask, mask.sum(dim=1))
        logits = out.logits
        return Prefill(batch, logits[:, -1], logits if all_logits else None)

    def extend(self, other: DecodeBatch) -> None:
        """Append ``other``'s rows after this batch's rows (both left-padded to one width)."""
        if self.size == 0:
            self.cache, self.mask = other.cache, other.mask
            self.positions, self.last = other.positions, other.last
            return
        width = max(self.width, other.width)
        mine, theirs = _pad_left(self, width), _pad_left(other, width)
        self.cache = _cache(
            [
                (torch.cat([k1, k2]), torch.cat([v1, v2]))
                for (k1, v1), (k2, v2) in zip(mine.layers, theirs.layers, strict=True)
            ]
        )
        self.mask = torch.cat([mine.mask, theirs.mask])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order) and trim all-padding leading columns."""
        if len(keep) == self.size:
            return
        if not keep:
            fresh = DecodeBatch.empty()
            self.cache, self.mask = fresh.cache, fresh.mask
            self.positions, self.last = fresh.positions, fresh.last
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0, 0]) if used.numel() else mask.shape[1]
        self.cache = _cache(
            [
                (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                for k, v in self.layers
            ]
        )
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.last = self.last.index_select(0, index)


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()


def _pad_left(batch: DecodeBatch, width: int) -> DecodeBatch:
    extra = width - batch.width
    if extra == 0:
        return batch
    mask = torch.nn.functional.pad(batch.mask, (extra, 0))
    layers = [
        (
            torch.nn.functional.pad(k, (0, 0, extra, 0)),
            torch.nn.functional.pad(v, (0, 0, extra, 0)),
        )
        for k, v in batch.layers
    ]
    return DecodeBatch(layers, mask, batch.positions)
