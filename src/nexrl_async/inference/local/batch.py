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
from transformers import PreTrainedModel

from nexrl_async.inference.local.lean_forward import KV, Forward, HFForward


@dataclass(frozen=True)
class Prefill:
    """A prefilled group of prompts: its batch, last-position logits ``[b, V]`` and, if asked,
    the logits of every prompt position ``[b, L, V]`` (left-padded like the prompts)."""

    batch: DecodeBatch
    last_logits: torch.Tensor
    all_logits: torch.Tensor | None


def _forward(model: Forward | PreTrainedModel) -> Forward:
    return HFForward(model) if isinstance(model, PreTrainedModel) else model


class DecodeBatch:
    """KV cache + attention mask + positions + newest tokens of the rows being decoded.

    ``model`` arguments take a :class:`~.lean_forward.Forward` (or a model: its own forward).
    """

    def __init__(self, kv: KV, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.kv = kv
        self.mask = mask
        self.positions = positions
        self.last = torch.zeros_like(positions)

    @property
    def layers(self) -> KV:
        """Per layer ``(keys, values)``, each ``[B, H, T, D]``."""
        return self.kv

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

    def decode(self, model: Forward | PreTrainedModel) -> torch.Tensor:
        """One forward step of every row on its ``last`` token; returns logits ``[B, V]``."""
        ones = torch.ones(self.size, 1, dtype=self.mask.dtype, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        logits, self.kv = _forward(model)(
            self.last[:, None], mask, self.positions[:, None], self.kv, last_only=True
        )
        self.mask = mask
        self.positions = self.positions + 1
        return logits[:, -1]

    @staticmethod
    def prefill(
        model: Forward | PreTrainedModel, prompts: list[list[int]], *, all_logits: bool
    ) -> Prefill:
        """Run ``prompts`` (left-padded) through the model; the result's ``last`` is unset.

        Identical prompts (the samples of a group) are computed once and their rows copied.
        """
        forward = _forward(model)
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        distinct = [list(p) for p in unique]
        width = max(len(p) for p in distinct)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in distinct], device=forward.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in distinct], device=forward.device
        )
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits, kv = forward(ids, mask, positions, [], last_only=not all_logits)
        batch = DecodeBatch(kv, mask, mask.sum(dim=1))
        if len(distinct) < len(prompts):
            batch.select(rows)
            logits = logits[torch.tensor(rows, device=logits.device)]
        return Prefill(batch, logits[:, -1], logits if all_logits else None)

    def extend(self, other: DecodeBatch) -> None:
        """Append ``other``'s rows after this batch's rows (both left-padded to one width)."""
        if self.size == 0:
            self.kv, self.mask = other.kv, other.mask
            self.positions, self.last = other.positions, other.last
            return
        width = max(self.width, other.width)
        mine, theirs = _pad_left(self, width), _pad_left(other, width)
        self.kv = [
            (torch.cat([k1, k2]), torch.cat([v1, v2]))
            for (k1, v1), (k2, v2) in zip(mine.kv, theirs.kv, strict=True)
        ]
        self.mask = torch.cat([mine.mask, theirs.mask])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order; a row may repeat) and trim all-padding
        leading columns."""
        if keep == list(range(self.size)):
            return
        if not keep:
            fresh = DecodeBatch.empty()
            self.kv, self.mask = fresh.kv, fresh.mask
            self.positions, self.last = fresh.positions, fresh.last
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0, 0]) if used.numel() else mask.shape[1]
        self.kv = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in self.kv
        ]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.last = self.last.index_select(0, index)


def _pad_left(batch: DecodeBatch, width: int) -> DecodeBatch:
    extra = width - batch.width
    if extra == 0:
        return batch
    mask = torch.nn.functional.pad(batch.mask, (extra, 0))
    kv = [
        (
            torch.nn.functional.pad(k, (0, 0, extra, 0)),
            torch.nn.functional.pad(v, (0, 0, extra, 0)),
        )
        for k, v in batch.kv
    ]
    return DecodeBatch(kv, mask, batch.positions)
