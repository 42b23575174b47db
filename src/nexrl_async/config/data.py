"""Recipe section ``[data]`` (and ``[validation.data]``): where items come from."""

from __future__ import annotations

from msgspec import Struct

from nexrl_async.config.types import NonNegInt, PathStr, PosInt, RefStr


class _DataCommon(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    fields: dict[str, str] = {}
    """Field mapping ``{our_name = "column"}``; unmapped columns keep their names."""
    required: list[str] = []
    """Fields (after mapping) every item must have; items lacking one fail as ``bad_item``."""
    shuffle: bool = True
    """Shuffle each epoch with ``seed + epoch``."""
    seed: int = 0
    """Shuffle seed."""
    epochs: PosInt = 1
    """Passes over the data; the run ends when they are exhausted (unless total_steps first)."""
    max_items: NonNegInt | None = None
    """Use only the first N rows (before shuffling)."""
    max_replays: NonNegInt = 2
    """Times an item whose group failed is handed out again; after that it is skipped and
    counted (``pipeline/abandoned_items``). Groups dropped as overdue always replay."""


class JsonlData(_DataCommon, frozen=True, kw_only=True, tag="jsonl"):
    """One JSON object per line."""

    path: PathStr
    """The .jsonl file."""


class ParquetData(_DataCommon, frozen=True, kw_only=True, tag="parquet"):
    """A parquet file."""

    path: PathStr
    """The .parquet file."""


class HFDiskData(_DataCommon, frozen=True, kw_only=True, tag="hf_disk"):
    """A folder written by ``datasets.Dataset.save_to_disk`` (needs the ``datasets`` package)."""

    path: PathStr
    """The dataset folder."""
    split: str | None = None
    """Split to read when the folder holds a DatasetDict."""


class PythonData(_DataCommon, frozen=True, kw_only=True, tag="python"):
    """Rows returned by a Python factory ``file.py:function`` (called with ``**kwargs``)."""

    factory: RefStr
    """``file.py:function`` returning an iterable of dicts."""
    kwargs: dict[str, str | int | float | bool] = {}
    """Keyword arguments passed to the factory."""


DataConfig = JsonlData | ParquetData | HFDiskData | PythonData
