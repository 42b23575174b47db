"""Data sources: jsonl, parquet, HF ``save_to_disk`` folders, HF Hub datasets from the local
cache, Python factories, and weighted mixtures of them; resumable cursors.

Owns: reading rows into :class:`~nexrl_async.core.records.DataItem` s, field mapping, seeded
shuffling, epochs, replay, the mixture's weighted draw, and the cursor state that checkpoints
save.
Must not import: torch, ``inference``, ``pipeline``, ``rollout``, ``train``, ``weights``,
``engine``.
"""

from __future__ import annotations

from nexrl_async.data.fields import map_fields, missing_fields
from nexrl_async.data.mixture import MixtureSource, source_of
from nexrl_async.data.readers import read_rows, resolve_path
from nexrl_async.data.source import RowSource, iterate_once, load_rows, open_source

__all__ = [
    "MixtureSource",
    "RowSource",
    "iterate_once",
    "load_rows",
    "map_fields",
    "missing_fields",
    "open_source",
    "read_rows",
    "resolve_path",
    "source_of",
]
