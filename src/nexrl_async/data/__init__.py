"""Data sources: jsonl, parquet, HF ``save_to_disk`` folders, Python factories; resumable cursor.

Owns: reading rows into :class:`~nexrl_async.core.records.DataItem` s, field mapping, seeded
shuffling, epochs, replay, and the cursor state that checkpoints save.
Must not import: torch, ``inference``, ``pipeline``, ``rollout``, ``train``, ``weights``,
``engine``.
"""
